"""The disk a training run needs, checked before the weights load, and a failed write told in one line.

A run writes checkpoints (the trainable weights, AdamW's two moments, its state), keeps at most two
sealed ones while sealing a third, a best/ adapter when evaluating, and at the end the adapter staged
beside them. ``needs`` predicts those sizes from the model's shape; ``check`` refuses a run whose
OUTPUT_DIR cannot hold them before minutes of loading. A write that still fails (the disk filled up
meanwhile) ends in ``write_error``'s one line: the path, the space needed and free, what is kept (the
last sealed checkpoint: a rerun resumes from it) and what to do. Standard library only.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from app.config import Config
from app.core import diskspace
from app.core.errors import UserError
from app.plan.estimator import ModelShape
from app.training.checkpoints import CHECKPOINTS, latest_checkpoint

log = logging.getLogger(__name__)

WEIGHT_BYTES = 4  # adapters and full-tuned weights are saved in fp32
ADAM_BYTES = 8  # optimizer.pt: two fp32 moments per trainable weight
SMALL_FILES = 64 * 1024  # trainer_state, RNG, scheduler, training_args, model card, configs
SEALED_KEPT = 3  # save_total_limit=2, and the newest is sealed before the oldest goes


@dataclass(frozen=True)
class DiskNeeds:
    checkpoint: int  # bytes of one checkpoint
    adapter: int  # bytes of the final adapter (and of best/)
    run: int  # the most the run holds at once

    def line(self) -> str:
        return (
            f"disk: about {diskspace.human(self.run)} at most in OUTPUT_DIR (checkpoints of "
            f"{diskspace.human(self.checkpoint)} each, the adapter {diskspace.human(self.adapter)})"
        )


def needs(cfg: Config, shape: ModelShape, model_path: str, trainable: int) -> DiskNeeds:
    """What this run writes, from the model's shape; ``trainable``: the plan's count (app.plan.peak)."""
    weights = trainable * WEIGHT_BYTES
    adapter = weights + _tokenizer_bytes(model_path) + SMALL_FILES
    checkpoint = weights + weights // WEIGHT_BYTES * ADAM_BYTES + SMALL_FILES  # the Trainer saves no tokenizer there
    return DiskNeeds(checkpoint, adapter, SEALED_KEPT * checkpoint + 2 * adapter)


def planned(cfg: Config, shape: ModelShape, model_path: str, out: Path, main: bool) -> DiskNeeds:
    """What this run will write, logged; on the rank that writes (``main``), refused if it cannot fit."""
    from app.plan.peak import trainable_params

    need = needs(cfg, shape, model_path, trainable_params(cfg, shape))
    log.info("%s", need.line())
    if main:
        check(out, need)
    return need


def check(out: Path, need: DiskNeeds) -> None:
    """Refuse, in one line, a run whose OUTPUT_DIR's disk cannot hold what it will write."""
    line = diskspace.shortfall(
        "OUTPUT_DIR",
        out,
        need.run,
        f"this run (checkpoints of {diskspace.human(need.checkpoint)} each, then the adapter)",
    )
    if line:
        raise UserError(line + "; nothing was written")


def write_error(
    e: BaseException, out: Path, doing: str, previous: str | None, need: int | None = None
) -> BaseException:
    """A full disk or a read-only/forbidden OUTPUT_DIR while writing: one line, what is kept, what to do.
    Anything else is returned as it is, for the caller to raise."""
    ckpt = latest_checkpoint(out / CHECKPOINTS)
    kept = (
        " and ".join(
            [f"the previous run's files there ({previous}) are untouched"] * bool(previous)
            + [f"the last sealed checkpoint, {ckpt}, is intact"] * bool(ckpt)
        )
        or "nothing half-written was left"
    )
    again = f"run the same command to resume from {ckpt}" if ckpt else "run the same command"
    if diskspace.is_full(e, out, need):
        return UserError(diskspace.full_line("OUTPUT_DIR", out, doing, need, kept, again))
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(
            f"OUTPUT_DIR={out}: cannot write ({os.strerror(e.errno).lower()}) while {doing}; {kept}. "
            f"Fix the permissions or choose another OUTPUT_DIR, then {again}"
        )
    return e


def _tokenizer_bytes(model_path: str) -> int:
    folder = Path(model_path)
    if not folder.is_dir():
        return 16 << 20  # a hub model not at hand: a large tokenizer's size
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.is_file()
        and (
            p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template"))
            or p.suffix == ".tiktoken"
        )
    )
