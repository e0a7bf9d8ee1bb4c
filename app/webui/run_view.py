"""What the UI shows of a run dir: its state (training, stopped with a checkpoint, finished), its progress and
its curves, read from the files training writes (metrics.jsonl, summary.json, train_config.json, checkpoints/,
the run lock). A run started from a terminal is watched the same way as one the UI started.
Standard library and pandas (which Gradio's plots take); no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.workspace import TINY_MODELS
from app.core.ownership import kind_of
from app.training import runlock
from app.training.checkpoints import CHECKPOINTS, latest_checkpoint, step_of
from app.training.metrics_file import read_metrics
from app.webui.paths import MODELS, project

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def run_dirs() -> list[str]:
    """Every run under models/ (a dir this tool's training wrote, or one training is starting in), newest first,
    as models/<name>."""
    root = project() / MODELS
    found = (
        [
            p
            for p in root.iterdir()
            if p.is_dir()
            and p.name not in TINY_MODELS
            and not p.name.startswith(".")
            and (kind_of(p) == "train" or (p / runlock.LOCK_FILE).exists())
        ]
        if root.is_dir()
        else []
    )
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p.relative_to(project())) for p in found]


def adapters() -> list[str]:
    """The finished runs that hold an adapter (what chat, evaluate and export load)."""
    return [d for d in run_dirs() if (project() / d / "adapter_config.json").is_file()]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class RunState:
    run: str
    state: str  # training | stopped | finished | new
    line: str  # one line for people

    @property
    def resumable(self) -> bool:
        return self.state == "stopped"


def rows_of(run: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows: read once per look, then handed to state() and progress()."""
    return read_metrics(project() / run / "metrics.jsonl")


def state(run: str, rows: list[dict[str, Any]] | None = None) -> RunState:
    out = project() / run
    who = runlock.holder(out)
    rows = [r for r in (rows_of(run) if rows is None else rows) if "loss" in r or "eval_loss" in r]
    step = rows[-1]["step"] if rows else 0
    total = next((r["max_steps"] for r in reversed(rows) if r.get("max_steps")), 0)
    if who is not None and who.get("command") == "train":
        return RunState(run, "training", f"training: pid {who.get('pid')}, step {step} of {total or '?'}")
    ckpt = latest_checkpoint(out / CHECKPOINTS)
    summary = _json(out / "summary.json")
    if summary and ckpt is None:
        return RunState(run, "finished", f"finished: {summary.get('steps')} steps")
    if ckpt is not None:
        return RunState(
            run,
            "stopped",
            f"stopped at step {step}: checkpoint {ckpt.relative_to(project())} "
            f"(step {step_of(ckpt)}); Resume continues from it",
        )
    return RunState(run, "new", "no checkpoint yet" if rows else "not started")


def progress(rows: list[dict[str, Any]]) -> str:
    """Progress, tokens/s, ETA and memory against the plan's budget, from the last logged row."""
    train = [r for r in rows if "loss" in r]
    if not train:
        return "no step logged yet"
    last = train[-1]
    step, total = last["step"], last.get("max_steps") or 0
    parts = [f"step {step}/{total or '?'}"]
    per_step = _seconds_per_step(train)
    if total and step:
        parts.append(f"{100 * step / total:.0f}%")
    if total and per_step is not None:
        parts.append(f"ETA {max(0.0, per_step * (total - step)):,.0f} s")
    parts.append(f"{last.get('tokens_per_s', 0):,.0f} tokens/s")
    parts.append(f"loss {last['loss']:.4f}")
    rss, budget = last.get("rss_mb"), last.get("budget_mb")
    if rss:
        parts.append(f"RSS {rss:,.0f} MB" + (f" of a {budget:,.0f} MB budget" if budget else ""))
    return " · ".join(parts)


def _seconds_per_step(train: list[dict[str, Any]]) -> float | None:
    """Seconds per step of the process now training. A resumed run's rows start their time_s again at the resume:
    its steps are timed from the step it resumed after, not from 0 (that made the ETA far too short)."""
    start = len(train) - 1
    while start > 0 and (train[start - 1].get("time_s") or 0.0) <= (train[start].get("time_s") or 0.0):
        start -= 1
    steps = train[-1]["step"] - (train[start - 1]["step"] if start > 0 else 0)
    return (train[-1].get("time_s") or 0.0) / steps if steps > 0 else None


def loss_plot(run: str) -> Figure | None:
    """The run's loss curve as training draws it into loss_curve.png (train, eval, eval F1), or None before
    the first logged step. A figure drawn on the server: the live plot stays right however often it changes."""
    from app.core.plots import text_context
    from app.training.metrics_file import loss_figure

    title = Path(run).name
    with text_context(title):
        return loss_figure(project() / run / "metrics.jsonl", title)


CURVES = (
    ("loss", "train loss"),
    ("eval_loss", "eval loss"),
    ("eval_f1", "eval F1"),
    ("rewards/margins", "train reward margin"),
    ("eval_rewards/margins", "eval reward margin"),
)  # STAGE=dpo/kto


def curves(runs: list[str]) -> pd.DataFrame:
    """A long table (step, value, series) of train loss, eval loss, eval F1 and a preference stage's reward margins
    for the plots: one run, or two to compare (then each series is prefixed with the run's name)."""
    import pandas as pd

    points = []
    for run in runs:
        prefix = f"{Path(run).name} " if len(runs) > 1 else ""
        for r in read_metrics(project() / run / "metrics.jsonl"):
            for key, label in CURVES:
                if isinstance(r.get(key), (int, float)):
                    points.append({"step": r["step"], "value": r[key], "series": prefix + label})
    # typed even when empty: the plot takes its axes' kinds from the first frame it gets, and an empty
    # untyped one would leave the loss axis a list of labels for good
    return pd.DataFrame(points, columns=["step", "value", "series"]).astype(
        {"step": "int64", "value": "float64", "series": "str"}
    )


SUMMARY_COLUMNS = [
    "run",
    "state",
    "method",
    "model",
    "data",
    "steps",
    "train loss",
    "eval loss",
    "seconds",
    "peak RSS MB",
]


def summary_rows() -> list[list[Any]]:
    """One row per run for the Runs table."""
    rows = []
    for run in run_dirs():
        out = project() / run
        s, c = _json(out / "summary.json"), _json(out / "train_config.json")
        method = " ".join(filter(None, (c.get("METHOD", ""), c.get("STAGE") if c.get("STAGE") != "sft" else "")))
        rows.append(
            [
                run,
                state(run).state,
                method,
                c.get("MODEL_NAME", ""),
                c.get("DATA_PATH", ""),
                s.get("steps", ""),
                s.get("train_loss", ""),
                s.get("eval_loss", ""),
                s.get("seconds", ""),
                s.get("peak_rss_mb", ""),
            ]
        )
    return rows


def summary_text(run: str) -> str:
    """A finished run's summary.json, pretty (or why there is none)."""
    s = _json(project() / run / "summary.json")
    return json.dumps(s, ensure_ascii=False, indent=1) if s else f"{run}: {state(run).line}"
