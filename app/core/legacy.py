"""Folders this tool wrote before they carried its marker (app.core.ownership.MARKER), recognised by their
contents, not their names alone: a user's folder that merely holds a `checkpoints/` or a `report.json` of
its own must never be taken for one, or `remove-run` would delete its files. Standard library only.

- a training run: a train_config.json naming MODEL_NAME and OUTPUT_DIR (every finished run wrote one), or a
  checkpoint this tool sealed (checkpoints/checkpoint-N/checkpoint_complete.json: a killed run);
- a token cache: a key folder (24 hex digits) holding the cache's meta.json;
- evaluation reports: report.json with n_samples, beside report.md and predictions.jsonl.

Only the entries such a folder's writer made count as the tool's; README.md only when it is PEFT's model card
(a run in a user's folder may have kept the user's own).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple


class Legacy(NamedTuple):
    is_one: Callable[[Path], bool]  # the folder is one of this kind, by what is in it
    names: tuple[str, ...]  # the entries such a folder's writer made (all else in it is someone's)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _old_run(folder: Path) -> bool:
    config = _json(folder / "train_config.json")
    return ("MODEL_NAME" in config and "OUTPUT_DIR" in config) or any(
        folder.glob("checkpoints/checkpoint-*/checkpoint_complete.json")
    )


_CACHE_KEY = "[0-9a-f]" * 24  # app.data.cache.cache_key


def _old_cache(folder: Path) -> bool:
    return any(fnmatch.fnmatchcase(p.parent.name, _CACHE_KEY) for p in folder.glob("*/meta.json"))


def _old_reports(folder: Path) -> bool:
    return (
        "n_samples" in _json(folder / "report.json")
        and (folder / "report.md").is_file()
        and (folder / "predictions.jsonl").is_file()
    )


LEGACY = {
    "train": Legacy(
        _old_run,
        (
            "adapter_model.safetensors",
            "adapter_config.json",
            "model*.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "generation_config.json",
            "README.md",
            "tokenizer*",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.*",
            "merges.txt",
            "*.tiktoken",
            "chat_template.*",
            "data_report.json",
            "train_config.json",
            "summary.json",
            "metrics.jsonl",
            "loss_curve.png",
            "best",
            "checkpoints",
            "runs",
            "mlflow.db",
            "wandb",
            "swanlab*",
            "trackio",
            "eval",
            "merged",
            "onnx",
        ),
    ),
    "token-cache": Legacy(_old_cache, (_CACHE_KEY, f".{_CACHE_KEY}.lock", ".*.partial-*")),
    "evaluate": Legacy(
        _old_reports,
        (
            "report.json",
            "report.md",
            "predictions.jsonl",
            "per_predicate_f1.png",
            ".per_predicate_f1.png.tmp",
            ".report.*",
            ".predictions.jsonl.*",
        ),
    ),
}


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def legacy_kind(folder: Path) -> str | None:
    """The kind of folder an older version wrote ``folder`` as, or None."""
    return next((kind for kind, legacy in LEGACY.items() if folder.is_dir() and legacy.is_one(folder)), None)


def legacy_entries(folder: Path, kind: str, names: set[str]) -> set[str]:
    """Of ``names`` (``folder``'s entries), those the older version's ``kind`` writer made."""
    ours = {n for n in names if matches(n, LEGACY[kind].names)}
    if "README.md" in ours and not _model_card(folder / "README.md"):
        ours.discard("README.md")
    return ours


def _model_card(path: Path) -> bool:
    """PEFT's model card (YAML front matter naming the library), not a README.md of the user's."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False
    return head.startswith("---") and "library_name: peft" in head
