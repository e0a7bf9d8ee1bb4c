"""An evaluation's reports: report.json, report.md (a table per predicate, or for text answers the
lowest-scoring samples), predictions.jsonl (gold vs output per record) and, for triplet data,
per_predicate_f1.png, each written whole (temp file + rename)."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from app.core import diskspace, ownership
from app.core.atomic import atomic_write_text, write_json
from app.core.errors import UserError
from app.evaluation.scoring import Report
from app.evaluation.textmetrics import TextReport

log = logging.getLogger(__name__)

REPORT_KIND = "evaluate"  # the kind of folder (app.core.ownership) evaluate writes its reports into


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _by_support(report: Report) -> list[tuple[str, dict]]:
    return sorted(report.per_predicate.items(), key=lambda kv: (-kv[1]["support"], kv[0]))


def _markdown(report: Report, title: str) -> str:
    d = report.to_dict()
    lines = [f"# {title or 'Evaluation report'}", "", "| metric | value |", "| --- | --- |"]
    for k in (
        "triplet_precision",
        "triplet_recall",
        "triplet_f1",
        "triplet_f1_typed",
        "classification_accuracy",
        "json_valid_rate",
        "loss",
        "n_samples",
        "n_triplet_samples",
        "n_classification_samples",
        "n_bad_gold",
        "n_recovered",
        "n_invalid_output",
    ):
        lines.append(f"| {k} | {_fmt(d[k])} |")
    lines += [
        "",
        "## Per predicate (sorted by support)",
        "",
        "| predicate | support | tp | fp | fn | precision | recall | f1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in _by_support(report):
        lines.append(
            f"| {name} | {m['support']} | {m['tp']} | {m['fp']} | {m['fn']} | "
            f"{_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} |"
        )
    if not report.per_predicate:
        lines.append("| (no triplets) | | | | | | | |")
    return "\n".join(lines) + "\n"


def _text_markdown(report: TextReport, title: str, worst: int = 10) -> str:
    """The means, then the samples with the lowest ROUGE-L (where to look first)."""
    d = report.to_dict()
    lines = [f"# {title or 'Evaluation report'}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(d[k])} |" for k in ("exact_match", "rouge_l", "bleu_4", "loss", "n_samples")]
    lines += [
        "",
        "Exact match, ROUGE-L (F1) and BLEU-4 are per-sample means on a 0-1 scale; loss is the reference "
        "answers' mean token loss under the model. How they are computed: docs/evaluation.md.",
        "",
        f"## Lowest ROUGE-L (up to {worst})",
        "",
        "| # | rouge_l | bleu_4 | gold | output |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(report.rows, key=lambda r: (r["rouge_l"], r["index"]))[:worst]:
        lines.append(
            f"| {r['index']} | {_fmt(r['rouge_l'])} | {_fmt(r['bleu_4'])} | {_cell(r['gold'])} | {_cell(r['output'])} |"
        )
    return "\n".join(lines) + "\n"


def _cell(text: str, width: int = 80) -> str:
    """One table cell: one line, pipes escaped, cut to ``width`` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _chart(report: Report, title: str) -> bytes:
    """PNG bytes of a horizontal per-predicate F1 bar chart."""
    from matplotlib.figure import Figure  # not pyplot: Agg canvas, no global backend or figure state

    from app.core.plots import text_context

    # barh draws bottom-up: reversed, the most frequent predicate is on top, as in report.md.
    items = _by_support(report)[::-1]
    labels = [f"{k} (n={m['support']})" for k, m in items]
    title = title or "Per-predicate F1"
    with text_context(title, *labels):  # predicates are Chinese: a CJK font, or one warning with the fix
        fig = Figure(figsize=(7, 1.2 + 0.28 * max(len(items), 1)))
        ax = fig.subplots()
        if items:
            ax.barh(labels, [m["f1"] for _, m in items])
        else:
            ax.text(0.5, 0.5, "no triplet samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_xlabel("F1")
        ax.set_title(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_reports(report: Report | TextReport, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write report.json, report.md, predictions.jsonl and (triplet data) per_predicate_f1.png; return
    {file name: path}."""
    out = Path(out_dir)
    paths = {name: out / name for name in ("report.json", "report.md", "predictions.jsonl", "per_predicate_f1.png")}
    try:
        ownership.register(out.parent, [out.name])  # eval/ in a run: the run's (remove-run takes it)
        ownership.claim(out, REPORT_KIND)
        ownership.register(out, paths)
        return _write(report, out, paths, title)
    except OSError as e:
        if not diskspace.is_full(e, out):
            raise
        raise UserError(
            diskspace.full_line(
                "EVAL_DIR",
                out,
                "writing the evaluation reports",
                None,
                "each report is written whole, so the earlier ones there are intact",
                "run the same command again",
            )
        ) from None


def _write(report: Report | TextReport, out: Path, paths: dict[str, Path], title: str) -> dict[str, Path]:
    write_json(paths["report.json"], report.to_dict())
    md = _text_markdown(report, title) if isinstance(report, TextReport) else _markdown(report, title)
    atomic_write_text(paths["report.md"], md)
    atomic_write_text(
        paths["predictions.jsonl"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.rows)
    )
    if isinstance(
        report, TextReport
    ):  # no predicates to chart; an older evaluation's chart in this folder would belong to other data
        paths.pop("per_predicate_f1.png").unlink(missing_ok=True)
        log.info("wrote %s to %s", ", ".join(paths), out)
        return paths
    try:
        png = _chart(report, title)  # rendered first: a failure leaves no partial file behind
        tmp = out / ".per_predicate_f1.png.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, paths["per_predicate_f1.png"])
    except ImportError:  # matplotlib is optional for scoring; the numbers are all in the text files
        log.warning("matplotlib is not installed; skipping %s", paths.pop("per_predicate_f1.png"))
    log.info("wrote %s to %s", ", ".join(paths), out)  # the caller logs the headline metrics
    return paths
