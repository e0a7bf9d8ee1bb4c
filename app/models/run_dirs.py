"""The trained runs under models/, and the last-run pointer (models/.last_run) that predict, evaluate,
merge and export read when ADAPTER_DIR is not set.

The pointer never names a run that is gone: `remove-run` moves it to the newest remaining run and says
so, and a command that finds it stale (the run deleted by hand) does the same. Standard library only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from app.core.atomic import atomic_write_text
from app.core.utils import LAST_RUN_FILE

log = logging.getLogger(__name__)

FINISHED = "summary.json"  # written last by a finished run (app/training/outputs.py)
LOADABLE = ("adapter_config.json", "config.json")  # an adapter, or a full model (METHOD=full)


def portable_path(path: Path) -> str:
    """Relative to the working dir when inside it: the same models/ is /app/models in the
    container and ./models on the host, so train in one runtime and predict in the other."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def point_last_run_at(run: Path) -> None:
    atomic_write_text(LAST_RUN_FILE, portable_path(run) + "\n")


def last_run() -> Path | None:
    """The run the pointer names (whether or not it still exists), or None without a pointer."""
    try:
        named = LAST_RUN_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return Path(named) if named else None


def trained_runs(root: Path = Path("models")) -> list[Path]:
    """Finished runs directly under ``root``, newest first (by when their summary.json was written)."""
    found = []
    for run in root.iterdir() if root.is_dir() else ():
        summary = run / FINISHED
        if run.is_dir() and summary.is_file() and any((run / f).is_file() for f in LOADABLE):
            found.append((summary.stat().st_mtime, str(run), run))
    return [run for _, _, run in sorted(found, reverse=True)]


def repoint(gone: Path, why: str) -> str:
    """The pointer named ``gone`` (``why``: removed, or missing): point it at the newest remaining run, or
    remove it. Returns the line that says what happened."""
    runs = [r for r in trained_runs() if not _same(r, gone)]
    if runs:
        point_last_run_at(runs[0])
        return (
            f"the last run {gone} is {why}: predict, evaluate, merge and export now use the newest remaining "
            f"run, {portable_path(runs[0])} (ADAPTER_DIR=<a run> picks another)"
        )
    LAST_RUN_FILE.unlink(missing_ok=True)
    return (
        f"the last run {gone} is {why} and no trained run is left under models/: train first (`make train`), "
        "or set ADAPTER_DIR=<a run dir> (ADAPTER_DIR=none: the base model)"
    )


def follow_removal(removed: Path) -> str | None:
    """After ``removed`` was deleted: repoint the pointer if it named it; the line to log, or None."""
    named = last_run()
    if named is None or not _same(named, removed):
        return None
    return repoint(named, "removed")


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)
