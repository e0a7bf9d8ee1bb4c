"""Reading a run's metrics.jsonl (MetricsJsonl in app/training/callbacks.py writes it) and drawing its loss
curve. Standard library and matplotlib only: the web UI watches a live run with it without importing torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (MetricsJsonl writes them), in order; [] when there is no
    file. A line a kill cut short is left out: it is logged again when the run resumes."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # blank, or cut short
    return rows


MARKERS_BELOW = 30  # train-loss points: a shorter run (the quick start logs 3) marks each point
F1_MARGIN = 0.05  # the F1 axis shows 0-1 with this margin


def loss_figure(metrics_path: Path, title: str = "") -> Figure | None:
    """Loss curve (train + eval, eval F1 on a second axis) from metrics.jsonl, as a matplotlib
    Figure not yet drawn or saved; None when there is nothing to plot. Build and save it inside
    ``app.core.plots.text_context(title)``, as :func:`plot_losses` does, so a Chinese title renders."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    f1 = [(r["step"], r["eval_f1"]) for r in rows if "eval_f1" in r]
    margins = [(r["step"], r["rewards/margins"]) for r in rows if "rewards/margins" in r]  # STAGE=dpo/kto
    eval_margins = [(r["step"], r["eval_rewards/margins"]) for r in rows if "eval_rewards/margins" in r]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure  # not pyplot: Agg canvas, no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    # Constrained layout makes room for the legend below the axes: inside them it covered the top left
    # corner, where a short run's first (highest) train loss sits.
    fig = Figure(figsize=(11 if margins else 7, 4), layout="constrained")
    ax, side = fig.subplots(1, 2) if margins else (fig.subplots(), None)
    if train:
        # A lone point is an invisible line without a marker, and markers show how few points a
        # short run has; a long run stays a plain line, where markers would only blur the curve.
        marker = "o" if len(train) < MARKERS_BELOW else None
        ax.plot(*zip(*train, strict=True), marker=marker, markersize=4, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")  # evaluations are few: always marked
    # Steps are whole: no 1.25, 1.5 ticks; min_n_ticks=1, else one step (range 0.95-1.05) gets fractions.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if f1:
        ax2 = ax.twinx()
        ax2.plot(*zip(*f1, strict=True), "s-", color="tab:green", label="eval F1")
        ax2.set_ylabel("triplet F1")
        ax2.set_ylim(-F1_MARGIN, 1 + F1_MARGIN)  # an F1 of 0 or 1 is drawn whole, not cut by the frame
    if side is not None:  # a preference stage: how far chosen answers score above rejected ones, beside the loss
        side.plot(
            *zip(*margins, strict=True),
            marker="o" if len(margins) < MARKERS_BELOW else None,
            markersize=4,
            color="tab:purple",
            label="train reward margin",
        )
        if eval_margins:
            side.plot(*zip(*eval_margins, strict=True), "s-", color="tab:red", label="eval reward margin")
        side.axhline(0, color="grey", linewidth=0.8)
        side.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        side.set_xlabel("optimizer step")
        side.set_ylabel("reward margin (chosen - rejected)")
        side.grid(alpha=0.3)
    handles = [line for a in fig.axes for line in a.lines if not str(line.get_label()).startswith("_")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig
