"""`make remove-run OUTPUT_DIR=<dir>`: delete exactly what one training run wrote, and nothing else.

The run's marker (app.core.ownership.MARKER) lists the entries the run wrote; those go, the marker last,
then the folder if that left it empty. Anything else there (a file the user put beside the run, or the
user's own folder that an older version trained into) stays, and is named. A folder without the marker
that is not a run of an older version is refused whole. When the removed run was the last run, the
pointer moves to the newest remaining one (app.models.run_dirs). Standard library only: it runs without the
virtualenv.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from app.config import Config
from app.core import ownership
from app.core.errors import UserError
from app.models.run_dirs import follow_removal
from app.training.checkpoints import RUN_KIND

log = logging.getLogger(__name__)


def remove_run(cfg: Config) -> Path:
    """Delete the files of the trained run the user named with OUTPUT_DIR=<dir>; keep and name the rest."""
    if "OUTPUT_DIR" not in cfg.explicit:
        raise UserError(
            "OUTPUT_DIR is not set: remove-run deletes exactly the run you name, e.g. "
            "make remove-run OUTPUT_DIR=models/tiny-lora"
        )
    out = Path(cfg.train.output_dir)
    if not out.is_dir():
        raise UserError(f"OUTPUT_DIR={out}: no such directory; nothing removed")
    _check_is_run(out)
    from app.training.runlock import LOCK_FILE, hold

    with hold(out, "remove-run", doing="removing it"):  # never from under a run still writing there
        owned = (ownership.owned_entries(out) or set()) - {ownership.MARKER, LOCK_FILE}
        files, size = _count(out, owned)
        log.warning("removing the trained run %s (%d files, %.1f MB)", out, files, size / 2**20)
        for name in sorted(owned):
            _delete(out / name)
        (out / ownership.MARKER).unlink(missing_ok=True)  # last: a kill before it leaves a run remove-run finds
    kept = sorted(set(os.listdir(out)) - {LOCK_FILE})
    if kept:
        shown = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in kept[:5])
        more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
        log.warning("kept %s in %s: not written by this tool, so the folder stays", shown + more, out)
    else:
        out.rmdir()
    note = follow_removal(out)
    if note:
        log.warning("%s", note)
    return out


def _check_is_run(out: Path) -> None:
    refused = ownership.refused_why(out, {})
    if refused:  # an older version trained into `/` or data/: never removed by name patterns there
        raise UserError(
            f"OUTPUT_DIR={out} is {refused}; remove-run never deletes there: delete the run's files "
            "yourself if you mean it"
        )
    marker = ownership.read_marker(out)
    if marker is not None and marker.get("kind") != RUN_KIND:
        raise UserError(
            f"OUTPUT_DIR={out} is this tool's {marker.get('kind')} folder, not a trained run; nothing "
            "removed. Delete it yourself if you mean it"
        )
    if marker is None and ownership.owned_entries(out) is None:
        raise UserError(
            f"OUTPUT_DIR={out} is not a run this tool wrote (no {ownership.MARKER}, no "
            "train_config.json); nothing removed. Delete it yourself if you mean it"
        )


def _count(out: Path, names: set[str]) -> tuple[int, int]:
    files = size = 0
    for name in names:
        path = out / name
        for f in [path] if not path.is_dir() or path.is_symlink() else path.rglob("*"):
            if f.is_file() and not f.is_symlink():
                files, size = files + 1, size + f.stat().st_size
    return files, size


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
