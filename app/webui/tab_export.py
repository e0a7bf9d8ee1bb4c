"""The Export tab: `python -m app merge` (the adapter folded into its base: a standalone model),
`python -m app export-onnx` and `python -m app export-gguf` (llama.cpp / Ollama), with their log as they run
and the paths they wrote."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from app.config import Config
from app.core.errors import UserError
from app.webui import run_view
from app.webui.context import Context, checked, problems_of
from app.webui.forms import Form, named
from app.webui.jobs import follow
from app.webui.paths import project


def outputs(cfg: Config, run: str, command: str) -> list[str]:
    """Where ``command`` writes for this run (the defaults: merged/ in it, onnx/ in that, gguf/ in the run)."""
    merged = cfg.predict.merged_dir or f"{run}/merged"
    return {
        "merge": [merged],
        "export-onnx": [merged, cfg.predict.onnx_dir or f"{merged}/onnx"],
        "export-gguf": [cfg.predict.gguf_dir or f"{run}/gguf"],
    }[command]


def build(ctx: Context) -> Form:
    pick = gr.Dropdown(
        run_view.adapters(), label="Adapter (ADAPTER_DIR)", value=None, allow_custom_value=True, elem_id="export-run"
    )
    form = Form("export", ctx.cfg)
    with gr.Row():
        merge_btn = gr.Button("Merge", variant="primary", elem_id="export-merge")
        onnx_btn = gr.Button("Export ONNX", elem_id="export-onnx")
        gguf_btn = gr.Button("Export GGUF", elem_id="export-gguf")
    message = gr.Textbox(label="Message", interactive=False, elem_id="export-message")
    log_tail = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id="export-log")
    paths = gr.Textbox(label="Written", interactive=False, elem_id="export-paths")
    fields = form.components()

    def run_command(command: str, run: str | None, *values: Any) -> Iterator[tuple[str, str, str]]:
        try:
            if not run:
                raise UserError("ADAPTER_DIR: pick a trained adapter")
            overrides = {**form.overrides(list(values)), "ADAPTER_DIR": run}
            cfg = checked(command, overrides)
            job = ctx.jobs.start(f"export:{run}", command, overrides)
        except (UserError, RuntimeError) as e:
            yield problems_of(e), "", ""
            return
        for tail in follow(job):
            yield f"running: {job.line}", tail, ""
        if job.proc.returncode:
            yield "\n".join(job.errors()) or job.status(), job.tail(), ""
            return
        written = [p for p in outputs(cfg, run, command) if (project() / p).is_dir()]
        yield f"done: {job.line}", job.tail(), "\n".join(written)

    def merge(run: str | None, *values: Any) -> Iterator[tuple[str, str, str]]:
        yield from run_command("merge", run, *values)

    def export(run: str | None, *values: Any) -> Iterator[tuple[str, str, str]]:
        yield from run_command("export-onnx", run, *values)

    def export_gguf(run: str | None, *values: Any) -> Iterator[tuple[str, str, str]]:
        yield from run_command("export-gguf", run, *values)

    merge_btn.click(named(merge, ["adapter_dir"], form), [pick, *fields], [message, log_tail, paths], api_name="merge")
    onnx_btn.click(
        named(export, ["adapter_dir"], form), [pick, *fields], [message, log_tail, paths], api_name="export_onnx"
    )
    gguf_btn.click(
        named(export_gguf, ["adapter_dir"], form), [pick, *fields], [message, log_tail, paths], api_name="export_gguf"
    )
    pick.focus(lambda: gr.update(choices=run_view.adapters()), None, pick, api_visibility="private")
    return form
