"""The Train tab: the settings (generated), the data file (upload into data/ or pick, with its format, record
count and bad lines, and a line when its records do not fit STAGE), the adapter STAGE=dpo/kto continues
(ADAPTER_DIR: a picker of finished runs), Plan (what `make info` prints), Start / Stop / Resume, and the run
watched live. For a first visit: a note when MODEL_NAME is not on this machine, a hint to Plan first, and Stop
only while a run trains (app/webui/guide.py).

Start checks what the command line checks, in this process and before anything is written (the path guard,
then the CLI's own pre-flight: settings, data, model, OUTPUT_DIR busy or finished, RESUME), and shows its
one-line messages; then it runs the very command it shows, as its own process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any

import gradio as gr

from app.config import Config
from app.core.errors import UserError
from app.training import runlock
from app.webui import run_view
from app.webui.context import Context, checked, problems_of
from app.webui.forms import Form, argv, command_line, named
from app.webui.guide import PLAN_HINT, model_note
from app.webui.jobs import error_lines, job_env
from app.webui.paths import DATA_TYPES, data_files, inspect_data, path_problem, path_problems, project, save_upload

PLAN_TIMEOUT_S = 600


def build(ctx: Context) -> Form:
    data_picker = lambda: gr.Dropdown(
        data_files(),
        value=ctx.cfg.data.data_path,
        label="DATA_PATH",  # noqa: E731
        allow_custom_value=True,
        elem_id="train-DATA_PATH",
        info=Config.variables()["DATA_PATH"][1].metadata["help"],
    )
    note = gr.Markdown(model_note(ctx.cfg.model.model_name), elem_id="train-model-note")
    with gr.Row():
        with gr.Column(scale=3):
            form = Form("train", ctx.cfg, {"DATA_PATH": data_picker})
        with gr.Column(scale=2):
            # no file_types: Gradio would refuse another type with its own words; the check in save_upload
            # gives the command line's line for it
            upload = gr.File(label=f"Upload a data file into data/ ({', '.join(DATA_TYPES)})", elem_id="train-upload")
            data_info = gr.Textbox(label="Data file", interactive=False, lines=2, elem_id="train-data-info")
            # "" not None when unset: a value, so that API callers may leave adapter_dir out
            start_from = gr.Dropdown(
                run_view.adapters(),
                value=ctx.cfg.predict.adapter_dir,
                allow_custom_value=True,
                label="Continue adapter (ADAPTER_DIR)",
                elem_id="train-ADAPTER_DIR",
                info="STAGE=dpo/kto: the finished SFT run to continue (its base and LoRA shape "
                "are kept); blank: a new adapter. STAGE=sft does not read it",
            )
            with gr.Row():
                plan_btn = gr.Button("Plan", elem_id="train-plan")
                start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                # only while the watched run trains: Stop on nothing looked like it did something
                stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop", interactive=False)
                resume_btn = gr.Button("Resume", elem_id="train-resume")
            hint = gr.Markdown(PLAN_HINT, elem_id="train-hint")
            message = gr.Textbox(label="Message", interactive=False, elem_id="train-message")
            command = gr.Textbox(
                label="Command line (paste into a terminal in the project dir)",
                interactive=False,
                buttons=["copy"],
                elem_id="train-command",
            )
    plan_out = gr.Textbox(label="Plan (make info)", lines=12, max_lines=40, interactive=False, elem_id="train-plan-out")
    watched = gr.Dropdown(
        run_view.run_dirs(),
        label="Watch run",
        allow_custom_value=True,
        elem_id="train-watch",
        value=None,
        info="a run started here or from a terminal",
    )
    status = gr.Textbox(label="Run", interactive=False, elem_id="train-status")
    progress = gr.Textbox(label="Progress", interactive=False, elem_id="train-progress")
    curve = gr.Plot(label="Loss", elem_id="train-curve")
    log_tail = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, autoscroll=True, elem_id="train-log")
    fields = form.components()

    def settings(adapter: str | None, values: tuple[Any, ...]) -> dict[str, str]:
        """The form's KEY=value arguments, and ADAPTER_DIR when the picker differs from the value in force."""
        overrides = form.overrides(list(values))
        if (adapter or "").strip() != ctx.cfg.predict.adapter_dir:
            overrides["ADAPTER_DIR"] = (adapter or "").strip()
        return overrides

    def on_upload(path: str | None, stage: str) -> tuple[Any, str]:
        if not path:
            return gr.update(), ""
        try:
            summary = save_upload(path, ctx.cfg)
        except UserError as e:
            return gr.update(), problems_of(e)
        return gr.update(choices=data_files(), value=summary.path), summary.line(stage)

    def on_data(path: str, stage: str) -> str:
        """The file's summary, and the line training would refuse it with under this STAGE (checked again as
        STAGE changes)."""
        if not path:
            return ""
        bad = path_problem("DATA_PATH", path)
        if bad:
            return problems_of(UserError(bad))
        try:
            return inspect_data(path).line(stage)
        except UserError as e:
            return problems_of(e)

    def plan(adapter: str | None, *values: Any) -> tuple[str, str, str, Any]:
        """Message, command line, what `info` printed, and the Plan-first hint: cleared once a plan is shown."""
        try:
            overrides = settings(adapter, values)
            if bad := path_problems(overrides):
                raise UserError(bad)
        except UserError as e:
            return problems_of(e), "", "", gr.update()
        done = subprocess.run(
            argv("info", overrides),
            cwd=project(),
            capture_output=True,
            text=True,
            timeout=PLAN_TIMEOUT_S,
            env=job_env(),
        )
        line = command_line("info", overrides)
        if done.returncode:
            return "\n".join(error_lines(done.stderr)) or done.stderr[-2000:], line, done.stdout, gr.update()
        return "", line, done.stdout, ""

    def start(adapter: str | None, *values: Any) -> tuple[str, str, Any]:
        try:
            overrides = settings(adapter, values)
            cfg = checked("train", overrides)
            job = ctx.jobs.start(cfg.train.output_dir, "train", overrides)
        except (UserError, RuntimeError) as e:
            return problems_of(e), gr.update(), gr.update()
        ctx.last_train[cfg.train.output_dir] = overrides
        return "", job.line, gr.update(choices=run_view.run_dirs() + [cfg.train.output_dir], value=cfg.train.output_dir)

    def stop(run: str | None) -> str:
        if not run:
            return "pick the run to stop under Watch run"
        job = ctx.jobs.get(run)
        if job is not None and job.stop():
            return f"sent SIGTERM to pid {job.proc.pid}: it saves a checkpoint, then stops (Resume continues it)"
        who = runlock.holder(run)
        if who and who.get("command") == "train" and who.get("host") == socket.gethostname() and who.get("pid"):
            os.kill(int(who["pid"]), signal.SIGTERM)  # started from a terminal: the same signal `kill` sends
            return f"sent SIGTERM to pid {who['pid']}: it saves a checkpoint, then stops (Resume continues it)"
        return f"{run}: {run_view.state(run).line}; nothing to stop"

    def resume(run: str | None, adapter: str | None, *values: Any) -> tuple[str, str]:
        now = run_view.state(run) if run else None
        if now is None or not now.resumable:
            return (
                f"{run or 'no run'}: {now.line if now else 'pick it under Watch run'}; nothing to resume",
                gr.update(),
            )
        overrides = ctx.last_train.get(run) or {**settings(adapter, values), "OUTPUT_DIR": run}
        try:
            checked("train", overrides)
            job = ctx.jobs.start(run, "train", overrides)
        except (UserError, RuntimeError) as e:
            return problems_of(e), gr.update()
        return "", job.line

    def look(run: str | None) -> tuple[str, str, int, str, Any]:
        """The run's state line, progress line, logged rows, log tail and Stop (enabled while it trains, or while
        the job the UI started for it runs, before it takes the run's lock): metrics.jsonl read once."""
        if not run:
            return "", "", 0, "", gr.update(interactive=False)
        rows, job = run_view.rows_of(run), ctx.jobs.get(run)
        now = run_view.state(run, rows)
        line = now.line
        if job is not None and not job.running() and job.proc.returncode:
            line += f" ({job.command} {job.status()})"
        training = now.state == "training" or (job is not None and job.running())
        return (
            line,
            run_view.progress(rows),
            len(rows),
            job.tail() if job is not None else "",
            gr.update(interactive=training),
        )

    def watch(run: str | None) -> tuple[str, str, Any, str, Any]:
        line, prog, _, tail, stoppable = look(run)
        return line, prog, run_view.loss_plot(run) if run else None, tail, stoppable

    def tick(run: str | None, shown: str) -> tuple[Any, ...]:
        """look() every 2 s; the plot is drawn and sent again only when the run has logged more."""
        line, prog, n, tail, stoppable = look(run)
        now = f"{run}:{n}" if run else ""
        return (
            line,
            prog,
            gr.update() if now == shown else run_view.loss_plot(run) if run else None,
            tail,
            stoppable,
            now,
        )

    data, stage = form.fields["DATA_PATH"], form.fields["STAGE"]
    upload.upload(named(on_upload, ["file", "stage"]), [upload, stage], [data, data_info], api_name="upload")
    data.change(named(on_data, ["data_path", "stage"]), [data, stage], data_info, api_name="inspect_data")
    stage.change(on_data, [data, stage], data_info, api_visibility="private")
    start_from.focus(lambda: gr.update(choices=run_view.adapters()), None, start_from, api_visibility="private")
    # again at each page load too (a model downloaded meanwhile, then a reload), and as MODEL_NAME is typed
    gr.on(
        None,
        named(model_note, ["model_name"]),
        form.fields["MODEL_NAME"],
        note,
        api_name="model_note",
        show_progress="hidden",
    )
    plan_btn.click(
        named(plan, ["adapter_dir"], form), [start_from, *fields], [message, command, plan_out, hint], api_name="plan"
    )
    start_btn.click(
        named(start, ["adapter_dir"], form), [start_from, *fields], [message, command, watched], api_name="start"
    )
    stop_btn.click(named(stop, ["run"]), watched, message, api_name="stop")
    resume_btn.click(
        named(resume, ["run", "adapter_dir"], form),
        [watched, start_from, *fields],
        [message, command],
        api_name="resume",
    )
    watch_outputs = [status, progress, curve, log_tail, stop_btn]
    shown = gr.State("")  # this page's plot: "run:logged rows"
    watched.change(named(watch, ["run"]), watched, watch_outputs, api_name="watch")
    gr.Timer(2.0).tick(
        tick, [watched, shown], [*watch_outputs, shown], show_progress="hidden", api_visibility="private"
    )
    return form
