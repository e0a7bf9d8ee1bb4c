"""Checkpoints that are whole or absent, which one to resume, and whether OUTPUT_DIR may be written.

A checkpoint is written by the Trainer into ``checkpoints/.incomplete/checkpoint-N`` (every rank's
files land there), its files are flushed to disk, a marker listing every file and its size is
written last, and only then is the directory renamed to ``checkpoints/checkpoint-N``. A run killed
at any moment (kill -9, power, a full disk) therefore leaves either a complete checkpoint or
debris under ``.incomplete`` that is never resumed; a ``checkpoint-N`` without a valid marker (a
copy, another tool's, an older version's) is skipped with a warning.

``check_output_dir`` runs before anything is loaded or written: OUTPUT_DIR must be writable, and a
finished run there is only replaced with OVERWRITE=1 (or an explicit RESUME=<checkpoint>).
Standard library only: the CLI runs these checks before importing torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from app.config import Config, default_output_dir
from app.config.fields import DataArgs
from app.core.atomic import fsync_dir
from app.core.errors import UserError
from app.models.artifacts import output_problem

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STAGING = ".incomplete"  # inside checkpoints/: where a checkpoint is written before it is sealed
MARKER = "checkpoint_complete.json"  # written last; lists every file with its size
PREFIX = "checkpoint-"
RUN_KIND = "train"  # the kind of folder (app.core.ownership) a training run writes
# Files a finished run leaves in OUTPUT_DIR (summary.json is written last).
FINISHED_MARKS = ("summary.json", "adapter_model.safetensors", "model.safetensors", "adapter_config.json")


def step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def is_complete(path: Path) -> bool:
    """The marker is there and every file it lists has the recorded size."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return bool(files) and all(
            (path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first; incomplete ones are named once in the log."""
    found = sorted((p for p in Path(ckpt_dir).glob(PREFIX + "*") if p.is_dir() and step_of(p) >= 0), key=step_of)
    good = [p for p in found if is_complete(p)]
    for p in found:
        if p not in good:
            log.warning("ignoring %s: incomplete (no valid %s; written by a killed run or copied in part)", p, MARKER)
    return good


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    good = complete_checkpoints(ckpt_dir)
    return good[-1] if good else None


def seal(staged: Path, final: Path, step: int) -> None:
    """Flush ``staged``'s files, write the marker last, then rename it to ``final`` (atomic)."""
    files: dict[str, int] = {}
    for f in sorted(p for p in staged.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(staged))] = f.stat().st_size
    tmp = staged / f".{MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, staged / MARKER)
    fsync_dir(staged)
    if final.exists():  # the same step saved twice (a resumed run re-saving): the new one wins
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(final.parent)
    try:
        staged.parent.rmdir()  # the staging dir, now empty
    except OSError:
        pass


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints."""
    good = [p for p in Path(ckpt_dir).glob(PREFIX + "*") if p.is_dir() and step_of(p) >= 0 and is_complete(p)]
    for old in sorted(good, key=step_of)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def clear_staging(ckpt_dir: Path) -> None:
    """Debris of a checkpoint that was being written when the last run died."""
    shutil.rmtree(Path(ckpt_dir) / STAGING, ignore_errors=True)


# ---- output dir and RESUME ----------------------------------------------------------------------


def finished_run(out: Path) -> str | None:
    """A short description when OUTPUT_DIR holds a finished run, else None."""
    marks = [m for m in FINISHED_MARKS if (out / m).is_file()]
    if not marks:
        return None
    try:
        steps = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("steps")
        return f"{steps} steps" if steps is not None else marks[0]
    except (OSError, ValueError, AttributeError):
        return marks[0]


def check_output_dir(cfg: Config) -> None:
    """Raise the first output_dir_problems() line (training re-checks just before it writes)."""
    problems = output_dir_problems(cfg)
    if problems:
        raise UserError(problems[0])


def output_dir_problems(cfg: Config) -> list[str]:
    """Before anything is loaded or written: OUTPUT_DIR is writable, and a finished run there is
    replaced only when asked (OVERWRITE=1, or RESUME=<a checkpoint>). At most one line."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        return [f"OUTPUT_DIR={out} is a file; point OUTPUT_DIR at a directory"]
    foreign = output_problem(cfg, out, "OUTPUT_DIR", RUN_KIND, instead=_another_dir(cfg, out))
    if foreign:
        return [foreign]  # someone's folder: nothing below may even create a file there
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"OUTPUT_DIR={out}: {probe} is a file, not a directory; choose another OUTPUT_DIR"]
    for d in (probe, out / CHECKPOINTS):
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            return [
                f"OUTPUT_DIR={out}: cannot write to {d} (permission denied or a read-only file "
                "system); choose a writable OUTPUT_DIR, or fix its permissions"
            ]
    done = finished_run(out) if out.is_dir() else None
    if done is None or latest_checkpoint(out / CHECKPOINTS) is not None:
        return []  # nothing finished there, or an unfinished run in progress (resumed)
    if cfg.train.overwrite or cfg.train.resume != "auto":
        return []
    if "RESUME" in cfg.explicit:
        return [
            f"RESUME=auto: OUTPUT_DIR={out} holds a finished run ({done}) and no checkpoint to "
            "continue from; set OVERWRITE=1 to train again, or RESUME=<a checkpoint-N dir>"
        ]
    return [
        f"OUTPUT_DIR={out} already holds a finished run ({done}); set OVERWRITE=1 to train again "
        "and replace it when the new run finishes, or choose another OUTPUT_DIR"
    ]


def _another_dir(cfg: Config, out: Path) -> str:
    """A good OUTPUT_DIR to suggest instead of ``out``: the default one, or a new folder beside it."""
    d = cfg.data
    default = default_output_dir(
        cfg.model.model_name, cfg.lora.method, d.data_path, DataArgs().data_path, cfg.train.stage
    )
    return default if Path(default).resolve() != out.resolve() else f"{default}-2"


def resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to continue from: RESUME=auto -> the newest complete one in
    OUTPUT_DIR/checkpoints (None when there is none); RESUME=<path> -> that checkpoint, or the newest
    complete one in that run dir. Raises a one-line UserError for a path that holds none."""
    choice = cfg.train.resume.strip()
    if choice == "auto":
        return latest_checkpoint(Path(cfg.train.output_dir) / CHECKPOINTS)
    path = Path(choice)
    if not path.is_dir():
        raise UserError(
            f"RESUME={choice}: no such directory; use RESUME=auto, a checkpoint-N dir, or a run's OUTPUT_DIR"
        )
    if path.name.startswith(PREFIX):
        if is_complete(path):
            return path
        if (path / "trainer_state.json").is_file() and not (path / MARKER).exists():
            log.warning(
                "RESUME=%s has no %s (not written by this tool): resuming, but it cannot be checked for completeness",
                choice,
                MARKER,
            )
            return path
        raise UserError(
            f"RESUME={choice}: an incomplete checkpoint (no valid {MARKER}: its run died while "
            "writing it); use an earlier checkpoint, or RESUME=auto"
        )
    for where in (path / CHECKPOINTS, path):
        found = latest_checkpoint(where)
        if found is not None:
            return found
    raise UserError(
        f"RESUME={choice}: no complete checkpoint there (looked for {CHECKPOINTS}/{PREFIX}N); "
        "use RESUME=auto, or point it at a checkpoint-N dir"
    )
