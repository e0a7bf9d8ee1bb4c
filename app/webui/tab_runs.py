"""The Runs tab: every run under models/ with its summary (steps, losses, time, peak memory, method, data),
one run's curves and summary, and two runs' curves on one plot to compare."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.webui import run_view
from app.webui.context import Context
from app.webui.forms import named
from app.webui.paths import path_problem


def build(ctx: Context) -> None:  # no settings: it reads run dirs
    refresh = gr.Button("Refresh", elem_id="runs-refresh")
    table = gr.Dataframe(
        value=run_view.summary_rows(),
        headers=run_view.SUMMARY_COLUMNS,
        interactive=False,
        elem_id="runs-table",
        wrap=True,
    )
    with gr.Row():
        first = gr.Dropdown(run_view.run_dirs(), label="Run", value=None, allow_custom_value=True, elem_id="runs-first")
        second = gr.Dropdown(
            run_view.run_dirs(), label="Compare with", value=None, allow_custom_value=True, elem_id="runs-second"
        )
    curve = gr.LinePlot(x="step", y="value", color="series", label="Curves", elem_id="runs-curve", height=320)
    summary = gr.Code(label="summary.json", language="json", elem_id="runs-summary")

    def show(a: str | None, b: str | None) -> tuple[Any, str]:
        bad = [line for r in (a, b) if r and (line := path_problem("OUTPUT_DIR", r))]
        if bad:
            return run_view.curves([]), "\n".join(bad)
        chosen = [r for r in (a, b) if r]
        return run_view.curves(list(dict.fromkeys(chosen))), run_view.summary_text(a) if a else ""

    def reload() -> tuple[Any, Any, Any]:
        names = run_view.run_dirs()
        return run_view.summary_rows(), gr.update(choices=names), gr.update(choices=names)

    refresh.click(reload, None, [table, first, second], api_name="runs")
    first.change(named(show, ["run", "compare_with"]), [first, second], [curve, summary], api_name="run_curves")
    second.change(show, [first, second], [curve, summary], api_visibility="private")
