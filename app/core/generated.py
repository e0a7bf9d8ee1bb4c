"""Single files the tool writes among a user's (sample data, predictions), and whether it may replace them.

Each is recorded with its SHA-256 in ``.generated.json`` beside it. Such a file is replaced only while it
still has the recorded hash: once someone edits it, it is theirs. `make clean` removes only the sample data
(kind ``sample``), which it can write again; predictions cost a model run and stay. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from app.core.atomic import atomic_write_text
from app.core.errors import UserError

MANIFEST = ".generated.json"  # {file name: sha256} (sample data), or {name: {"sha256", "kind"}}
SAMPLE, PREDICTIONS = "sample", "predictions"


def predictions_path(input_file: str, output_file: str) -> Path:
    """Where predict-file writes: OUTPUT_FILE, else <INPUT_FILE without its suffix>.pred.jsonl beside it."""
    return Path(output_file or Path(input_file).with_suffix("").as_posix() + ".pred.jsonl")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded(folder: Path) -> dict[str, tuple[str, str]]:
    """name -> (sha256, kind) of what the tool wrote in ``folder``."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for name, value in data.items() if isinstance(data, dict) else ():
        if isinstance(value, str):
            out[str(name)] = (value, SAMPLE)
        elif isinstance(value, dict) and isinstance(value.get("sha256"), str):
            out[str(name)] = (value["sha256"], str(value.get("kind", SAMPLE)))
    return out


def record(path: Path, kind: str = SAMPLE) -> None:
    """Note in the manifest beside ``path`` that the tool wrote it, with its hash."""
    rows = recorded(path.parent)
    rows[path.name] = (sha256(path), kind)
    write_manifest(path.parent, rows)


def write_manifest(folder: Path, rows: dict[str, tuple[str, str]]) -> None:
    if not rows:
        (folder / MANIFEST).unlink(missing_ok=True)
        return
    data = {name: sha if kind == SAMPLE else {"sha256": sha, "kind": kind} for name, (sha, kind) in rows.items()}
    atomic_write_text(folder / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


def is_unchanged(path: Path, kind: str | None = None) -> bool:
    """True when ``path`` is a file this tool wrote (of ``kind``, if given) and nobody changed since."""
    row = recorded(path.parent).get(path.name)
    return row is not None and (kind is None or row[1] == kind) and path.is_file() and sha256(path) == row[0]


def replace_problem(path: Path, setting: str) -> str | None:
    """Why the file ``path`` may not be replaced: it is there and not the tool's unchanged output."""
    if path.is_dir():
        return f"{setting}={path} is a directory; point {setting} at a file"
    if path.exists() and not is_unchanged(path):
        return (
            f"{setting}={path} exists and this tool did not write it (or it was changed since); it is never "
            f"replaced: choose another {setting}, or move that file away"
        )
    return None


def refuse_unless_generated(path: Path, command: str) -> None:
    """Before ``command`` rewrites one of its own generated files: refuse if a user's file is there."""
    if path.exists() and not is_unchanged(path):
        raise UserError(
            f"{command} writes {path}, but a file that this tool did not write (or that was changed "
            "since) is there; move it elsewhere, then run the command again"
        )
