"""The Evaluate tab: `python -m app evaluate` on a dev file with a trained adapter, then its report: P/R/F1 and the
per-predicate chart for triplet data (exact match, ROUGE-L, BLEU-4 and loss for other answers), and each sample's
gold vs predicted answer, errors first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from app.config import Config
from app.core.errors import UserError
from app.webui import run_view
from app.webui.context import Context, checked, problems_of
from app.webui.forms import Form, named
from app.webui.jobs import follow
from app.webui.paths import data_files, project

METRICS = (
    "triplet_precision",
    "triplet_recall",
    "triplet_f1",
    "triplet_f1_typed",
    "classification_accuracy",
    "json_valid_rate",
    "exact_match",
    "rouge_l",
    "bleu_4",
    "loss",
    "n_samples",
    "n_invalid_output",
)
SAMPLE_COLUMNS = ["#", "result", "gold", "predicted", "missing", "spurious"]


def report_tables(eval_dir: Path) -> tuple[list[list[Any]], str | None, list[list[Any]]]:
    """(metric rows, the chart's path, per-sample rows with the errors first) of an evaluation's reports."""
    report = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    metrics = [[k, report.get(k)] for k in METRICS if k in report]
    chart = eval_dir / "per_predicate_f1.png"
    samples = []
    for line in (eval_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        wrong = bool(
            r.get("missing")
            or r.get("spurious")
            or r.get("label_correct") is False
            or r.get("kind") == "invalid"
            or r.get("exact_match") is False
        )  # a text answer not exact
        result = "bad gold" if r.get("bad_gold") else "error" if wrong else "correct"
        samples.append(
            [r.get("index"), result, r.get("gold"), r.get("output"), _spo(r.get("missing")), _spo(r.get("spurious"))]
        )
    order = {"error": 0, "bad gold": 1, "correct": 2}
    samples.sort(key=lambda row: (order[row[1]], row[0]))
    return metrics, str(chart) if chart.is_file() else None, samples


def _spo(items: Any) -> str:
    return "; ".join(json.dumps(i, ensure_ascii=False) for i in items or [])


def build(ctx: Context) -> Form:
    pick = gr.Dropdown(
        run_view.adapters(), label="Adapter (ADAPTER_DIR)", value=None, allow_custom_value=True, elem_id="eval-run"
    )

    def eval_path() -> gr.Dropdown:
        return gr.Dropdown(
            data_files(),
            label="EVAL_PATH",
            allow_custom_value=True,
            value=ctx.cfg.evaluation.eval_path or None,
            elem_id="evaluate-EVAL_PATH",
            info=Config.variables()["EVAL_PATH"][1].metadata["help"],
        )

    form = Form("evaluate", ctx.cfg, {"EVAL_PATH": eval_path})
    run_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    message = gr.Textbox(label="Message", interactive=False, elem_id="eval-message")
    log_tail = gr.Textbox(label="Log", lines=6, max_lines=6, interactive=False, elem_id="eval-log")
    metrics = gr.Dataframe(headers=["metric", "value"], interactive=False, elem_id="eval-metrics", label="Scores")
    chart = gr.Image(label="Per-predicate F1", elem_id="eval-chart", interactive=False)
    samples = gr.Dataframe(
        headers=SAMPLE_COLUMNS,
        interactive=False,
        wrap=True,
        elem_id="eval-samples",
        label="Samples (errors first)",
        max_height=500,
    )
    fields = form.components()

    def evaluate(run: str | None, *values: Any) -> Iterator[tuple[Any, ...]]:
        keep = (gr.update(), gr.update(), gr.update())
        try:
            if not run:
                raise UserError("ADAPTER_DIR: pick a trained adapter to evaluate")
            overrides = {**form.overrides(list(values)), "ADAPTER_DIR": run}
            cfg = checked("evaluate", overrides)
            job = ctx.jobs.start(f"evaluate:{run}", "evaluate", overrides)
        except (UserError, RuntimeError) as e:
            yield (problems_of(e), "", *keep)
            return
        for tail in follow(job):
            yield (f"running: {job.line}", tail, *keep)
        if job.proc.returncode:
            yield ("\n".join(job.errors()) or job.status(), job.tail(), *keep)
            return
        rows, png, per_sample = report_tables(project() / (cfg.evaluation.eval_dir or f"{run}/eval"))
        yield (f"done: {job.line}", job.tail(), rows, png, per_sample)

    run_btn.click(
        named(evaluate, ["adapter_dir"], form),
        [pick, *fields],
        [message, log_tail, metrics, chart, samples],
        api_name="evaluate",
    )
    pick.focus(lambda: gr.update(choices=run_view.adapters()), None, pick, api_visibility="private")
    return form
