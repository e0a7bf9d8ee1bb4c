"""Resume only the run that was asked for.

Every checkpoint carries the settings it was trained with (``run_settings.json``, sealed with the
checkpoint's other files) and a fingerprint of its data. Before a run continues a checkpoint,
the settings asked for now are compared with those:

* FIXED settings define what is trained, on what, and how the optimizer's saved state reads;
  a difference is refused in one line that lists each (saved -> asked). Continuing would crash
  (LORA_R: "size mismatch for lora_B") or, worse, quietly train the old run (DATA_PATH: the old
  checkpoint, its old step count, published as done).
* KEPT settings are the ones the tier chooses when you leave them unset. Left unset, a resumed
  run keeps the checkpoint's values: free memory differs from one start to the next, and a
  re-run of the same command must not be refused (or silently re-planned) because of it.
* Everything else (NUM_EPOCHS/MAX_STEPS upward, SAVE_STEPS, LOGGING_STEPS, EVAL_STEPS,
  NUM_THREADS, BATCH_SIZE x GRAD_ACCUM with the same product, ...) may change, and is logged.

A MAX_STEPS (or NUM_EPOCHS) whose step count is below the checkpoint's step is refused: there
is nothing left to train, and "done" would publish the old run. Standard library only (the CLI's
pre-flight runs this before torch is imported).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import TIERED, Config, Setting, show
from app.core.errors import UserError
from app.data.record_sources import fingerprint

log = logging.getLogger(__name__)

SETTINGS_FILE = "run_settings.json"
FIXED = (
    "MODEL_NAME",
    "METHOD",
    "QUANT_LEVEL",
    "LORA_R",
    "LORA_ALPHA",
    "LORA_DROPOUT",
    "LORA_TARGETS",
    "USE_DORA",
    "USE_RSLORA",
    "LORA_INIT",
    "PRE_SEQ_LEN",
    "PREFIX_PROJECTION",
    "DATA_PATH",
    "VAL_PATH",
    "DATA_FORMAT",
    "VAL_SIZE",
    "MAX_SAMPLES",
    "SEED",
    "MAX_SEQ_LEN",
    "PACKING",
    # the optimizer's and scheduler's saved state carry these: a new value would be silently ignored
    "LEARNING_RATE",
    "LR_SCHEDULER",
    "WARMUP_RATIO",
    "WEIGHT_DECAY",
    "OPTIM",
    # what the loss is, and the adapter a preference stage continues
    "STAGE",
    "PREF_LOSS",
    "PREF_BETA",
    "PREF_FTX",
    "SIMPO_GAMMA",
    "KTO_CHOSEN_WEIGHT",
    "KTO_REJECTED_WEIGHT",
    "ADAPTER_DIR",
)
KEPT = TIERED + ("LORA_ALPHA",)  # the GPU tiers set LORA_ALPHA = 2 x LORA_R
# Not about what is trained: where it goes, how it is launched, what inference does afterwards.
_SECTIONS = ("model", "data", "lora", "resources", "train", "distributed")
_IGNORED = {
    "OUTPUT_DIR",
    "RESUME",
    "OVERWRITE",
    "REPORT_TO",
    "REPLACE_DATA",
    "NPROC",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TRUST_REMOTE_CODE",
    "CACHE_DIR",
    "NUM_PROC",
}


def run_vars() -> list[Setting]:
    """The settings a checkpoint records: the training sections', and ADAPTER_DIR (the adapter STAGE=dpo/kto
    continues)."""
    names: list[Setting] = [v for v, (sec, _) in Config.variables().items() if sec in _SECTIONS and v not in _IGNORED]
    return [*names, "ADAPTER_DIR"]


def run_value(cfg: Config, var: Setting) -> Any:
    """A setting as training reads it: ADAPTER_DIR is predict's too, and STAGE=sft training does not read it."""
    if var == "ADAPTER_DIR":
        given = cfg.predict.adapter_dir.strip()
        return "" if cfg.train.stage == "sft" or given.lower() == "none" else given
    return cfg.get(var)


def snapshot(cfg: Config, world_size: int, data: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records: the settings as this run trains them (after the tier and any
    back-off), the world size, and the data fingerprints taken when the run started."""
    return {"settings": {v: run_value(cfg, v) for v in run_vars()}, "world_size": world_size, "data": data}


def data_fingerprints(cfg: Config) -> dict[str, Any]:
    return {"DATA_PATH": fingerprint(cfg.data.data_path), "VAL_PATH": fingerprint(cfg.data.val_path)}


@dataclass
class ResumeCheck:
    checkpoint: Path
    step: int
    known: bool = True  # False: an older version's checkpoint without run_settings.json
    differences: list[str] = field(default_factory=list)  # FIXED changes, and a step count below `step`
    changes: list[str] = field(default_factory=list)  # allowed changes, logged
    kept: dict[str, Any] = field(default_factory=dict)  # KEPT values taken from the checkpoint

    def refusal(self, cfg: Config) -> str | None:
        """The one line refusing this resume, or None when it may go on."""
        if not self.differences:
            return None
        what = "; ".join(self.differences)
        fix = (
            "To continue it, run with its settings; to train anew, set OVERWRITE=1 (replaces it) or choose "
            "another OUTPUT_DIR"
        )
        if cfg.train.resume.strip() != "auto":
            return (
                f"RESUME={cfg.train.resume}: {self.checkpoint} (step {self.step}) cannot continue as asked: "
                f"{what}. Resume with its settings, or leave RESUME=auto and set OVERWRITE=1 or another "
                "OUTPUT_DIR to train anew"
            )
        return (
            f"OUTPUT_DIR={cfg.train.output_dir} holds an unfinished run ({self.checkpoint.name}, step "
            f"{self.step}) that cannot continue as asked: {what}. {fix}"
        )

    def log(self) -> None:
        if not self.known:
            log.warning(
                "%s has no %s (written by an older version): its settings cannot be compared with "
                "these; resuming it as they are",
                self.checkpoint,
                SETTINGS_FILE,
            )
        if self.kept:
            log.info(
                "resuming with the checkpoint's %s (chosen when the run started; a new run would plan them again)",
                ", ".join(f"{k}={show(v)}" for k, v in self.kept.items()),
            )
        if self.changes:
            log.info("resuming with changed settings: %s", ", ".join(self.changes))


def check(cfg: Config, checkpoint: Path) -> ResumeCheck:
    """Compare ``cfg`` with what ``checkpoint`` was trained with (see the module docstring)."""
    rc = ResumeCheck(checkpoint, checkpoint_step(checkpoint))
    saved = _saved(checkpoint)
    if saved is None:
        rc.known = False
        return rc
    old = saved.get("settings", {})
    for var in run_vars():
        if var not in old:
            continue
        now = run_value(cfg, var)
        if var in KEPT and _unset(cfg, var):
            if show(old[var]) != show(now):
                rc.kept[var] = old[var]
            continue
        if show(old[var]) != show(now):
            (rc.differences if var in FIXED else rc.changes).append(f"{var} {_q(old[var])} -> {_q(now)}")
    data_vars: tuple[Setting, ...] = ("DATA_PATH", "VAL_PATH")
    for var in data_vars:
        was, path = saved.get("data", {}).get(var), cfg.get(var)
        if was and show(old.get(var)) == show(path):
            now_fp = fingerprint(path)
            if now_fp != was:
                how = (
                    "is gone"
                    if now_fp is None
                    else f"changed since ({was['size']:,} -> {now_fp['size']:,} bytes)"
                    if now_fp["size"] != was["size"]
                    else "changed since (same size, other contents)"
                )
                rc.differences.append(f"{var}={path} {how}")
    _batch(rc, cfg, old, saved.get("world_size", 1))
    _steps(rc, cfg, checkpoint)
    return rc


def _batch(rc: ResumeCheck, cfg: Config, old: dict[str, Any], old_world: int) -> None:
    """BATCH_SIZE and GRAD_ACCUM may trade against each other (the memory guard does), but their
    product with the process count fixes what one step is, and where in the data the run stands."""
    if "BATCH_SIZE" not in old or "GRAD_ACCUM" not in old:
        return
    batch = rc.kept.get("BATCH_SIZE", cfg.train.batch_size)
    accum = rc.kept.get("GRAD_ACCUM", cfg.train.grad_accum)
    world = cfg.distributed.nproc * cfg.distributed.nnodes
    was, now = old["BATCH_SIZE"] * old["GRAD_ACCUM"] * old_world, batch * accum * world
    if was != now:
        rc.differences.append(
            f"samples per step (BATCH_SIZE x GRAD_ACCUM x processes) {old['BATCH_SIZE']}x"
            f"{old['GRAD_ACCUM']}x{old_world}={was} -> {batch}x{accum}x{world}={now}"
        )


def _steps(rc: ResumeCheck, cfg: Config, checkpoint: Path) -> None:
    """A step count below the checkpoint's step: nothing would be trained, the old run published."""
    t = cfg.train
    if t.max_steps:
        if t.max_steps < rc.step:
            rc.differences.append(
                f"MAX_STEPS={t.max_steps} is below its step {rc.step}, so nothing is left to "
                f"train (MAX_STEPS above {rc.step} continues it)"
            )
        return
    state = _state(checkpoint)
    planned, epochs = state.get("max_steps"), state.get("num_train_epochs")
    if planned and epochs and float(epochs) == int(epochs):  # steps per epoch known exactly
        total = math.ceil(planned / epochs * t.num_epochs)
        if total < rc.step:
            rc.differences.append(f"NUM_EPOCHS={show(t.num_epochs)} gives {total} steps, below its step {rc.step}")


def _unset(cfg: Config, var: Setting) -> bool:
    return var not in cfg.explicit or show(cfg.get(var)) == "auto"


def _q(value: Any) -> str:
    text = show(value)
    return text if text else "''"


def _saved(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path} is damaged ({str(e)[:80]}); delete {checkpoint} to resume from an earlier "
            "checkpoint, or set OVERWRITE=1 to train anew"
        ) from None


def _state(checkpoint: Path) -> dict[str, Any]:
    try:
        data = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a checkpoint was saved at (its trainer_state.json, else its name)."""
    step = _state(checkpoint).get("global_step")
    if isinstance(step, int):
        return step
    try:
        return int(checkpoint.name.rsplit("-", 1)[-1])
    except ValueError:
        return 0


def decide(cfg: Config) -> tuple[ResumeCheck | None, bool]:
    """(the checked checkpoint RESUME points at, or None; whether it is to be discarded instead).

    A checkpoint that cannot continue as asked is refused (UserError), except with OVERWRITE=1 and
    RESUME=auto: that asks for a new run in its place, so its checkpoints go (the caller says so)."""
    from app.training.checkpoints import resume_checkpoint

    ckpt = resume_checkpoint(cfg)
    if ckpt is None:
        return None, False
    rc = check(cfg, ckpt)
    line = rc.refusal(cfg)
    if line is None:
        return rc, False
    if cfg.train.overwrite and cfg.train.resume.strip() == "auto":
        return rc, True
    raise UserError(line)
