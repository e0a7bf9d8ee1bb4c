"""Which folders this tool may write into and delete from: never one that holds a user's files.

A folder a command writes into (a training run, an evaluation's reports, the token cache) is new,
empty, or marked as this tool's by MARKER, written there before anything else. The marker lists the
top-level entries the tool wrote (``entries``), so `remove-run` deletes exactly those and leaves,
and names, whatever someone put there since. A folder holding anything else is refused before any
work, in one line naming up to three of its entries and the fix.

Some folders are refused whatever they hold (``refused_why``): the filesystem root, the home dir,
the project's root, data/ and models/, and any folder that is, or holds, an input the command reads
(DATA_PATH, VAL_PATH, EVAL_PATH, INPUT_FILE, MODEL_NAME ...): run files mixed into them could not be
told apart from the inputs, and the web UI's data picker would offer them as training files.

Folders written before the marker existed are recognised by their contents (app.core.legacy) and adopted:
only the entries this tool writes count as the run's. Standard library only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from app.core.atomic import atomic_write_text
from app.core.legacy import LEGACY, legacy_entries, legacy_kind, matches

MARKER = "run_manifest.json"
TOOL = "ChatGLM-CPU-Trainer"
RUN_LOCK = ".trainer-run.lock"  # app.training.runlock's: held while a command writes there, deleted after
# Hidden names the tool's own writers leave for a moment (staged_dir, atomic_write_text's temp files, the run
# lock, replace_dir's partial/old copies): in a folder that is the tool's they are its own debris.
TRANSIENT = (".staging.*", RUN_LOCK, ".*.partial-*", ".*.old-*", f".{MARKER}.*")
RUN_NAMES = LEGACY["train"].names + TRANSIENT  # what a run writes (also under no marker)


def read_marker(folder: str | Path) -> dict | None:
    """The folder's marker, or None when it has none (or a damaged one: then it is not the tool's)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL or not isinstance(data.get("entries"), list):
        return None
    return data


def owned_entries(folder: str | Path) -> set[str] | None:
    """The entries of ``folder`` this tool wrote (listed in its marker, or an older version's: app.core.legacy),
    or None when the folder is not the tool's."""
    folder = Path(folder)
    marker = read_marker(folder)
    names = _names(folder)
    if marker is not None:
        listed = {str(e) for e in marker["entries"]} | {MARKER}
        return {n for n in names if n in listed or matches(n, TRANSIENT)} | listed
    kind = legacy_kind(folder)
    return None if kind is None else legacy_entries(folder, kind, names) | {n for n in names if matches(n, TRANSIENT)}


def kind_of(folder: str | Path) -> str | None:
    """What the tool wrote ``folder`` as (its marker's kind, or an older version's folder by its contents)."""
    marker = read_marker(folder)
    return str(marker.get("kind")) if marker is not None else legacy_kind(Path(folder))


def foreign_entries(folder: str | Path) -> list[str]:
    """Entries of an existing ``folder`` the tool did not write, sorted (all of them for a folder not its own)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    owned = (owned_entries(folder) or set()) | {RUN_LOCK}  # the lock: this command's own, taken before it writes
    return sorted(n for n in _names(folder) if n not in owned)


def write_problem(
    folder: str | Path, setting: str, kind: str, refused: str | None = None, instead: str = ""
) -> str | None:
    """Why ``folder`` may not be written into as a ``kind`` folder, or None. ``refused``: refused_why's
    answer for it; ``instead``: an example of a good value for the message."""
    folder = Path(folder)
    fix = f"choose another {setting}" + (f", e.g. {setting}={instead}" if instead else "")
    if refused:
        return refused_line(folder, setting, refused, instead)
    if folder.exists() and not folder.is_dir():
        return f"{setting}={folder} is a file; {fix}"
    found = kind_of(folder)
    if found is not None and found != kind:
        return f"{setting}={folder} is this tool's {found} folder, not a {kind} folder; {fix}"
    foreign = foreign_entries(folder)
    if not foreign:
        return None
    shown = ", ".join(n + ("/" if (folder / n).is_dir() else "") for n in foreign[:3])
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return (
        f"{setting}={folder} holds files this tool did not write ({shown}{more}); it writes only into a new "
        f"or empty folder, or one it made (marked by {MARKER}): {fix}, or move those files away"
    )


def refused_line(folder: str | Path, setting: str, refused: str, instead: str = "") -> str:
    """The one line for a folder refused whatever it holds (``refused``: refused_why's answer)."""
    return (
        f"{setting}={folder} is {refused}; this tool writes only into a folder of its own: choose another "
        f"{setting}" + (f", e.g. {setting}={instead}" if instead else "")
    )


def refused_why(folder: str | Path, inputs: Mapping[str, str | Path], project: str | Path = ".") -> str | None:
    """Why ``folder`` is never written into, whatever it holds (see the module docstring), or None.
    ``inputs``: how each input is named (``DATA_PATH=x``) -> its path; ``project``: the project's root."""
    target = _real(folder)
    root = _real(project)
    named = {
        _home(): "your home directory",
        Path("/"): "the filesystem root",
        root: "the project's root folder",
        root / "data": "the project's data/ folder (your data files)",
        root / "models": "the project's models/ folder (every run and model lives in a folder of its own under it)",
    }  # later names win where two are one folder (a container's HOME=/app)
    if target in named:
        return named[target]
    for named_as, path in inputs.items():
        if not str(path).strip():
            continue
        read = _real(path)
        if target == read or target in read.parents:
            return f"the folder that {'is' if target == read else 'holds'} {named_as} (what this command reads)"
    return None


def claim(folder: str | Path, kind: str) -> None:
    """Make ``folder`` (if needed) and mark it as the tool's ``kind`` folder before anything else is
    written there; a legacy run's files are listed as its entries. Checked first with write_problem."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if read_marker(folder) is None:
        entries = sorted((owned_entries(folder) or set()) - {MARKER})
        _write_marker(
            folder, {"tool": TOOL, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "entries": entries}
        )


def register(folder: str | Path, names: Iterable[str]) -> None:
    """Add top-level ``names`` to the entries of a marked ``folder`` (call it before writing them, so a
    kill in between leaves nothing unlisted); a folder without a marker is left alone."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return
    new = sorted(set(marker["entries"]) | {n for n in names if n != MARKER and "/" not in n})
    if new != marker["entries"]:
        _write_marker(folder, {**marker, "entries": new})


def entries_now(folder: str | Path) -> set[str]:
    """The top-level names in ``folder`` now (register_new's ``before``)."""
    return _names(Path(folder))


def register_new(folder: str | Path, before: set[str], patterns: Iterable[str]) -> None:
    """List what appeared in ``folder`` since ``before`` under a name matching ``patterns`` (a tracker's files,
    say): a file someone else put there meanwhile, under another name, stays theirs."""
    register(folder, {n for n in _names(Path(folder)) - before if matches(n, patterns)})


def _write_marker(folder: Path, data: dict) -> None:
    atomic_write_text(folder / MARKER, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def _names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _home() -> Path:
    try:  # a container's uid may have no passwd entry and no HOME: then there is no home to protect
        return _real(Path.home())
    except (RuntimeError, KeyError):
        return Path("/")  # (named as the root below)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))
