"""What the Train tab's controls do (app/webui/tab_train.py lays them out): inspect an uploaded or picked data
file, Plan (`python -m app info`), Start / Stop / Resume a run, and read the watched run every 2 s.

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

from app.core.errors import UserError
from app.training import runlock
from app.webui import run_view
from app.webui.context import Context, checked, problems_of
from app.webui.forms import Form, argv, command_line
from app.webui.jobs import error_lines, job_env
from app.webui.paths import data_files, inspect_data, path_problem, path_problems, project, save_upload

PLAN_TIMEOUT_S = 600


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


class TrainActions:
    """What the tab's buttons, pickers and timer do, over the UI's context and the settings form."""

    def __init__(self, ctx: Context, form: Form):
        self.ctx, self.form = ctx, form

    def settings(self, adapter: str | None, values: tuple[Any, ...]) -> dict[str, str]:
        """The form's KEY=value arguments, and ADAPTER_DIR when the picker differs from the value in force."""
        overrides = self.form.overrides(list(values))
        if (adapter or "").strip() != self.ctx.cfg.predict.adapter_dir:
            overrides["ADAPTER_DIR"] = (adapter or "").strip()
        return overrides

    def on_upload(self, path: str | None, stage: str) -> tuple[Any, str]:
        if not path:
            return gr.update(), ""
        try:
            summary = save_upload(path, self.ctx.cfg)
        except UserError as e:
            return gr.update(), problems_of(e)
        return gr.update(choices=data_files(), value=summary.path), summary.line(stage)

    def plan(self, adapter: str | None, *values: Any) -> tuple[str, str, str, Any]:
        """Message, command line, what `info` printed, and the Plan-first hint: cleared once a plan is shown."""
        try:
            overrides = self.settings(adapter, values)
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

    def start(self, adapter: str | None, *values: Any) -> tuple[str, Any, Any]:
        try:
            overrides = self.settings(adapter, values)
            cfg = checked("train", overrides)
            job = self.ctx.jobs.start(cfg.train.output_dir, "train", overrides)
        except (UserError, RuntimeError) as e:
            return problems_of(e), gr.update(), gr.update()
        out = cfg.train.output_dir
        self.ctx.last_train[out] = overrides
        return "", job.line, gr.update(choices=run_view.run_dirs() + [out], value=out)

    def stop(self, run: str | None) -> str:
        if not run:
            return "pick the run to stop under Watch run"
        job = self.ctx.jobs.get(run)
        if job is not None and job.stop():
            return f"sent SIGTERM to pid {job.proc.pid}: it saves a checkpoint, then stops (Resume continues it)"
        who = runlock.holder(run)
        if who and who.get("command") == "train" and who.get("host") == socket.gethostname() and who.get("pid"):
            os.kill(int(who["pid"]), signal.SIGTERM)  # started from a terminal: the same signal `kill` sends
            return f"sent SIGTERM to pid {who['pid']}: it saves a checkpoint, then stops (Resume continues it)"
        return f"{run}: {run_view.state(run).line}; nothing to stop"

    def resume(self, run: str | None, adapter: str | None, *values: Any) -> tuple[str, Any]:
        if not run:
            return "no run: pick it under Watch run; nothing to resume", gr.update()
        now = run_view.state(run)
        if not now.resumable:
            return f"{run}: {now.line}; nothing to resume", gr.update()
        overrides = self.ctx.last_train.get(run) or {**self.settings(adapter, values), "OUTPUT_DIR": run}
        try:
            checked("train", overrides)
            job = self.ctx.jobs.start(run, "train", overrides)
        except (UserError, RuntimeError) as e:
            return problems_of(e), gr.update()
        return "", job.line

    def look(self, run: str | None) -> tuple[str, str, int, str, Any]:
        """The run's state line, progress line, logged rows, log tail and Stop (enabled while it trains, or while
        the job the UI started for it runs, before it takes the run's lock): metrics.jsonl read once."""
        if not run:
            return "", "", 0, "", gr.update(interactive=False)
        rows, job = run_view.rows_of(run), self.ctx.jobs.get(run)
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

    def watch(self, run: str | None) -> tuple[str, str, Any, str, Any]:
        line, prog, _, tail, stoppable = self.look(run)
        return line, prog, run_view.loss_plot(run) if run else None, tail, stoppable

    def tick(self, run: str | None, shown: str) -> tuple[Any, ...]:
        """look() every 2 s; the plot is drawn and sent again only when the run has logged more."""
        line, prog, n, tail, stoppable = self.look(run)
        now = f"{run}:{n}" if run else ""
        return (
            line,
            prog,
            gr.update() if now == shown else run_view.loss_plot(run) if run else None,
            tail,
            stoppable,
            now,
        )
