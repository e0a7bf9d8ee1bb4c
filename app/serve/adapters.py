"""Which adapters `serve` offers, under which names, and the guard on a path a client asks it to load.

ADAPTERS names them (comma-separated dirs, or name=dir); left empty it is every trained LoRA run under
the models dir. Every adapter must resolve inside that dir: a path with ``..`` or a symlink that leads
out of it is refused, since load_lora_adapter takes paths from the network. No torch here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import UserError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # what a request's `model` may be


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    base: str | None  # the MODEL_NAME it was trained on (train_config.json), if recorded
    method: str | None  # lora, qlora, ptuning (None: not recorded)


def inside(root: Path, path: str | Path) -> Path | None:
    """``path`` (relative to the working dir, or absolute) resolved, symlinks followed, if it lies inside
    ``root``; else None."""
    resolved = Path(path).resolve()
    top = root.resolve()
    return resolved if resolved == top or top in resolved.parents else None


def read_adapter(name: str, path: Path) -> Adapter:
    """The adapter in ``path``, or a one-line UserError saying why it is not one."""
    if not NAME.match(name):
        raise UserError(f"adapter name {name!r}: use letters, digits and . _ : - (at most 128)")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: no adapter_config.json there (a trained LoRA run's dir is)")
    try:
        saved = (
            json.loads((path / "train_config.json").read_text(encoding="utf-8"))
            if (path / "train_config.json").is_file()
            else {}
        )
        peft = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: its adapter_config.json or train_config.json cannot be read ({e})") from None
    if not isinstance(saved, dict) or not isinstance(peft, dict):
        raise UserError(f"{path}: adapter_config.json and train_config.json must hold JSON objects")
    method = saved.get("METHOD") or ("ptuning" if peft.get("peft_type") == "PREFIX_TUNING" else None)
    base = saved.get("MODEL_NAME") or peft.get("base_model_name_or_path")
    return Adapter(name, path, base, method)


def discover(spec: str, root: Path) -> list[Adapter]:
    """ADAPTERS: '' = every trained LoRA run under ``root`` (named by its dir), 'none' = no adapter, else
    comma-separated ``dir`` or ``name=dir`` entries. Raises a UserError naming ADAPTERS for a bad entry."""
    spec = spec.strip()
    if spec.lower() == "none":
        return []
    if not spec:
        runs = sorted(p.parent for p in root.glob("*/adapter_config.json")) if root.is_dir() else []
        found = []
        for run in runs:
            try:
                found.append(read_adapter(_name_for(run), run))
            except UserError as e:
                log.warning("serve: skipping %s (%s)", run, e)
        return found
    out: list[Adapter] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, _, where = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = inside(root, where)
        if path is None:
            raise UserError(
                f"ADAPTERS: {where} is not inside {root}/; serve only adapters under it (move or copy the run there)"
            )
        try:
            out.append(read_adapter(name or _name_for(path), path))
        except UserError as e:
            raise UserError(f"ADAPTERS: {e}") from None
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise UserError(
            f"ADAPTERS: the names {', '.join(sorted({n for n in names if names.count(n) > 1}))} are "
            "given twice; name them apart with name=dir"
        )
    return out


def _name_for(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", path.name).strip("-.") or "adapter"
    return name[:128]
