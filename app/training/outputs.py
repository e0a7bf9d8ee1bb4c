"""What a training run leaves in OUTPUT_DIR.

The finished run's files appear together, each whole (staged, then renamed), summary.json last:
it marks a finished run. metrics.jsonl is the live log; after a resume it is cut back to the
checkpoint's step so it reads as one uninterrupted run. Rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import TIERED, Config
from app.core import ownership
from app.core.atomic import atomic_write_text, staged_dir, write_json
from app.data.encode import EncodeStats
from app.models.loading import save_kwargs
from app.models.run_dirs import point_last_run_at
from app.training import dist, trackers
from app.training.callbacks import plot_losses
from app.training.checkpoints import CHECKPOINTS, RUN_KIND, clear_staging
from app.training.disk import write_error
from app.training.metrics_file import read_metrics

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"  # written last: it marks a finished run


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float
    seconds: float
    peak_rss_mb: float


def publish(
    ft: Any,
    out: Path,
    ckpt_dir: Path,
    result: TrainResult,
    peaks: dict[str, Any],
    weights: dict[str, torch.Tensor] | None,
    timing: dict[str, Any],
) -> None:
    """The finished run of FineTuner ``ft`` into ``out``: adapter (``weights``: ZeRO-3's gathered
    state dict, else None), tokenizer, data report, config as it ran, loss plot and best/, then
    summary.json (with ``timing``: the predicted and measured step time) and models/.last_run.
    Until then an earlier run's files stay."""
    with staged_dir(out) as tmp:
        ft.model.save_pretrained(
            tmp, **({"state_dict": weights} if weights is not None else {}), **save_kwargs(ft.model)
        )
        ft.tokenizer.save_pretrained(tmp)
        write_json(tmp / "data_report.json", ft.data_report)
        ft.cfg.save(tmp / "train_config.json")  # as it ran, after any back-off
        if (out / METRICS).is_file():
            plot_losses(out / METRICS, tmp / "loss_curve.png")
        if (ckpt_dir / "best").is_dir():
            os.replace(ckpt_dir / "best", tmp / "best")
        ownership.register(out, [p.name for p in tmp.iterdir()] + [SUMMARY])  # listed before they appear
    estimate = ft.plan.estimate
    write_json(
        out / SUMMARY,
        {
            **{k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()},
            "memory": peaks,
            "plan": {v: ft.cfg.get(v) for v in TIERED},  # what the tier, the memory fit or the guard set
            "records": ft.records,
            "warnings": list(ft.plan.warnings),
            "world_size": dist.world_size(),
            "predicted_peak_mb": estimate and round(estimate.total_mb, 1),
            **timing,
        },
    )
    point_last_run_at(out)


def open_output_dir(out: Path, cfg: Config, discard: bool, resume_from: Path | None, previous: str | None) -> None:
    """OUTPUT_DIR marked as the tool's before anything else is written there (the pre-flight found it new, empty
    or ours), with what the run will write listed; a dead run's half checkpoint, OVERWRITE=1's old checkpoints
    (``discard``) and a fresh run's stale log removed."""
    ckpt_dir = out / CHECKPOINTS
    try:
        ownership.claim(out, RUN_KIND)
        ownership.register(out, [CHECKPOINTS, METRICS, *trackers.run_entries(cfg.train.report_to)])
    except OSError as e:
        raise write_error(e, out, "creating OUTPUT_DIR", previous) from None
    clear_staging(ckpt_dir)  # debris of a checkpoint that was being written when a run died
    if discard and ckpt_dir.is_dir():  # OVERWRITE=1 asked for a new run in its place
        shutil.rmtree(ckpt_dir)
        log.info("removed the unfinished run's checkpoints in %s (OVERWRITE=1)", ckpt_dir)
    if resume_from is None or ckpt_dir.resolve() != resume_from.resolve().parent:
        (out / METRICS).unlink(missing_ok=True)  # a fresh run (or one from elsewhere) starts a fresh log


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the rows a killed run logged after the checkpoint resumed from (they are logged again),
    so metrics.jsonl and the loss curve read as one uninterrupted run. Returns the kept rows."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if dist.is_main() and len(kept) < len(rows):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def mean_logged_loss(path: Path) -> float:
    """The mean training loss over all steps from metrics.jsonl, each logged loss weighted by the
    steps it covers: the Trainer's own figure after a resume counts only the resumed part."""
    total, last = 0.0, 0
    for r in sorted((r for r in read_metrics(path) if "loss" in r), key=lambda r: r["step"]):
        total, last = total + r["loss"] * (r["step"] - last), r["step"]
    return total / last if last else 0.0


def encode_stats(s: EncodeStats) -> dict[str, Any]:
    """data_report.json's figures for one split."""
    lengths = sorted(s.lengths)
    return {
        "samples": s.samples,
        "tokens": s.tokens,
        "prompt_truncated": s.prompt_truncated,
        "answer_truncated": s.answer_truncated,
        "median_len": lengths[len(lengths) // 2] if lengths else 0,
        "max_len": lengths[-1] if lengths else 0,
    }
