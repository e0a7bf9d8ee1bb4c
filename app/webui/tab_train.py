"""The Train tab: the settings (generated), the data file (upload into data/ or pick, with its format, record
count and bad lines, and a line when its records do not fit STAGE), the adapter STAGE=dpo/kto continues
(ADAPTER_DIR: a picker of finished runs), Plan (what `make info` prints), Start / Stop / Resume, and the run
watched live. For a first visit: a note when MODEL_NAME is not on this machine, a hint to Plan first, and Stop
only while a run trains (app/webui/guide.py).

What each control does is app/webui/train_actions.py (Start checks what the command line checks before anything
is written, then runs the very command it shows, as its own process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.config import Config
from app.webui import run_view
from app.webui.context import Context
from app.webui.forms import Form, named
from app.webui.guide import PLAN_HINT, model_note
from app.webui.paths import DATA_TYPES, data_files
from app.webui.train_actions import TrainActions, on_data


def build(ctx: Context) -> Form:
    note = gr.Markdown(model_note(ctx.cfg.model.model_name), elem_id="train-model-note")
    with gr.Row():
        with gr.Column(scale=3):
            form = Form("train", ctx.cfg, {"DATA_PATH": lambda: _data_picker(ctx)})
        with gr.Column(scale=2):
            controls = _controls(ctx)
    below = _below()
    act = TrainActions(ctx, form)
    _wire_data(act, controls, note)
    _wire_commands(act, controls, below)
    _wire_watch(act, controls, below)
    return form


@dataclass
class _Controls:
    """The column beside the settings: the data file, the adapter to continue, the buttons and what they say."""

    upload: gr.File
    data_info: gr.Textbox
    start_from: gr.Dropdown
    plan_btn: gr.Button
    start_btn: gr.Button
    stop_btn: gr.Button
    resume_btn: gr.Button
    hint: gr.Markdown
    message: gr.Textbox
    command: gr.Textbox


@dataclass
class _Below:
    """Under the settings: the plan, and the run watched."""

    plan_out: gr.Textbox
    watched: gr.Dropdown
    status: gr.Textbox
    progress: gr.Textbox
    curve: gr.Plot
    log_tail: gr.Textbox

    def watch_outputs(self, stop_btn: gr.Button) -> list[Any]:
        return [self.status, self.progress, self.curve, self.log_tail, stop_btn]


def _data_picker(ctx: Context) -> gr.Dropdown:
    return gr.Dropdown(
        data_files(),
        value=ctx.cfg.data.data_path,
        label="DATA_PATH",
        allow_custom_value=True,
        elem_id="train-DATA_PATH",
        info=Config.variables()["DATA_PATH"][1].metadata["help"],
    )


def _controls(ctx: Context) -> _Controls:
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
    return _Controls(upload, data_info, start_from, plan_btn, start_btn, stop_btn, resume_btn, hint, message, command)


def _below() -> _Below:
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
    return _Below(plan_out, watched, status, progress, curve, log_tail)


def _wire_data(act: TrainActions, c: _Controls, note: gr.Markdown) -> None:
    form = act.form
    data, stage = form.fields["DATA_PATH"], form.fields["STAGE"]
    c.upload.upload(named(act.on_upload, ["file", "stage"]), [c.upload, stage], [data, c.data_info], api_name="upload")
    data.change(named(on_data, ["data_path", "stage"]), [data, stage], c.data_info, api_name="inspect_data")
    stage.change(on_data, [data, stage], c.data_info, api_visibility="private")
    c.start_from.focus(lambda: gr.update(choices=run_view.adapters()), None, c.start_from, api_visibility="private")
    # again at each page load too (a model downloaded meanwhile, then a reload), and as MODEL_NAME is typed
    gr.on(
        None,
        named(model_note, ["model_name"]),
        form.fields["MODEL_NAME"],
        note,
        api_name="model_note",
        show_progress="hidden",
    )


def _wire_commands(act: TrainActions, c: _Controls, b: _Below) -> None:
    form, fields = act.form, act.form.components()
    c.plan_btn.click(
        named(act.plan, ["adapter_dir"], form),
        [c.start_from, *fields],
        [c.message, c.command, b.plan_out, c.hint],
        api_name="plan",
    )
    c.start_btn.click(
        named(act.start, ["adapter_dir"], form),
        [c.start_from, *fields],
        [c.message, c.command, b.watched],
        api_name="start",
    )
    c.stop_btn.click(named(act.stop, ["run"]), b.watched, c.message, api_name="stop")
    c.resume_btn.click(
        named(act.resume, ["run", "adapter_dir"], form),
        [b.watched, c.start_from, *fields],
        [c.message, c.command],
        api_name="resume",
    )


def _wire_watch(act: TrainActions, c: _Controls, b: _Below) -> None:
    outputs = b.watch_outputs(c.stop_btn)
    shown = gr.State("")  # this page's plot: "run:logged rows"
    b.watched.change(named(act.watch, ["run"]), b.watched, outputs, api_name="watch")
    gr.Timer(2.0).tick(
        act.tick, [b.watched, shown], [*outputs, shown], show_progress="hidden", api_visibility="private"
    )
