"""What the tool writes into the project's data/ and models/ dirs, and what it may remove.

A user's data and trained runs live in the same dirs as the tool's own regenerable files, so
nothing here removes or replaces a file on a guess:
- sample data is written only where no file is (or where the same tool wrote it and nobody changed
  it since), and every file written is recorded with its SHA-256 in ``.generated.json`` beside it;
- ``clean`` removes only what the tool made and can make again: the tiny models, sample data whose
  hash still matches the record, caches. It names what it keeps and why;
- a trained run goes only with ``remove-run OUTPUT_DIR=<that dir>``, the one command that names it.
Standard library only: ``make clean`` works without the virtualenv.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from app.config import Config
from app.core import generated, ownership
from app.core.atomic import atomic_write_text
from app.core.errors import UserError
from app.core.generated import MANIFEST
from app.core.generated import record as record_generated

log = logging.getLogger(__name__)

SAMPLE_TRAIN, SAMPLE_DEV = 400, 50
# Regenerable models the tool builds under models/ (app.models.tiny.tiny_dir names; demo-glm is make demo's
# random-init base). Listed, not globbed, so a user's models/tiny-whatever is never taken for one.
TINY_MODELS = ("tiny-glm", "tiny-qwen2", "tiny-qwen3", "tiny-llama", "tiny-gemma3", "demo-glm")
TOKEN_CACHE = "models/.cache/tokens"  # the token cache at its default CACHE_DIR
CACHES = (".pytest_cache", TOKEN_CACHE)


# STAGE=dpo/kto's sample files when DATA_PATH is left at its default (which names the SFT sample's file)
PREF_SAMPLES = {"dpo": ("pref.jsonl", "pref_dev.jsonl"), "kto": ("kto.jsonl", "kto_dev.jsonl")}


def sample_paths(train_path: str | Path) -> dict[str, Path]:
    """Sample data goes to DATA_PATH itself and dev.jsonl beside it (what EVAL_PATH defaults to)."""
    train = Path(train_path)
    return {"train": train, "dev": train.with_name("dev.jsonl" if train.name != "dev.jsonl" else "dev-sample.jsonl")}


def write_sample_data(
    train_path: str | Path,
    seed: int = 42,
    replace: bool = False,
    only_missing: bool = False,
    stage: str = "sft",
    named: bool = True,
) -> list[Path]:
    """Write the synthetic triplet data for STAGE ``stage``; return the files written.

    sft: context/target records; dpo: preference pairs (the gold answer against a mistake); kto: half gold,
    half mistakes, labelled. Where DATA_PATH was not ``named`` by the user and is its default, dpo/kto write
    data/pref.jsonl + pref_dev.jsonl (kto.jsonl + kto_dev.jsonl) beside the SFT sample instead.
    A file that exists is kept unless it is unchanged sample data (then it is rewritten) or
    ``replace`` (REPLACE_DATA=1, the user's explicit ask). ``only_missing`` (the automatic case in
    ``train``) writes the missing files and keeps the rest; otherwise an existing file is refused,
    with one line, before anything is written.
    """
    paths = sample_paths(train_path)
    if stage in PREF_SAMPLES and not named and Path(train_path) == Path(Config().data.data_path):
        paths = {split: paths["train"].with_name(name) for split, name in zip(paths, PREF_SAMPLES[stage], strict=True)}
    keep = {k: p for k, p in paths.items() if p.exists() and not replace and not generated.is_unchanged(p)}
    if keep and not only_missing:
        names = " and ".join(str(p) for p in keep.values())
        verb = "exists and is" if len(keep) == 1 else "exist and are"
        raise UserError(
            f"DATA_PATH={paths['train']}: {names} {verb} not sample data this tool wrote; generate-data "
            "never replaces such a file: use another DATA_PATH (e.g. DATA_PATH=data/sample/train.jsonl), "
            "or REPLACE_DATA=1 to overwrite it"
        )
    rows = _sample_rows(stage, seed)
    written = []
    for split, path in paths.items():
        if split in keep:
            log.info("kept %s (exists, not written by this tool)", path)
            continue
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
        record_generated(path)
        written.append(path)
    if written and not only_missing:  # the automatic case says it itself, as a warning
        files = ", ".join(f"{p} ({len(rows[s])} records)" for s, p in paths.items() if p in written)
        if stage == "sft":
            log.info("wrote the synthetic triplet sample data (seed %d): %s", seed, files)
        else:
            log.info(
                "wrote synthetic %s sample data (seed %d; the gold triplets against realistic mistakes): %s; "
                "next: make train STAGE=%s DATA_PATH=%s",
                "preference pair" if stage == "dpo" else "KTO",
                seed,
                files,
                stage,
                paths["train"],
            )
    return written


def _sample_rows(stage: str, seed: int) -> dict[str, list[dict]]:
    """The train and dev records of STAGE's sample: one call each, so train and dev never share a prompt, and the
    pairs' prompts are none of the SFT sample's (its held-out records stay unseen by a dpo run after it)."""
    from app.data.synthetic import generate_samples
    from app.data.synthetic_pairs import generate_kto, generate_pairs

    n = SAMPLE_TRAIN + SAMPLE_DEV
    samples = generate_samples(n, seed=seed)
    if stage in PREF_SAMPLES:
        make = generate_pairs if stage == "dpo" else generate_kto
        samples = make(n, seed=seed, avoid=[s["context"] for s in samples])
    return {"train": samples[:SAMPLE_TRAIN], "dev": samples[SAMPLE_TRAIN:]}


def ensure_default_data(cfg: Config) -> None:
    """``train`` with DATA_PATH left at its default and no file there: write the sample data, and say
    so. Any DATA_PATH the user named is only ever read."""
    default = Config().data.data_path
    path = Path(cfg.data.data_path)
    if "DATA_PATH" in cfg.explicit or cfg.data.data_path != default or path.exists():
        return
    written = write_sample_data(path, seed=cfg.train.seed, only_missing=True)
    log.warning(
        "DATA_PATH=%s did not exist: wrote the synthetic sample data (%s; not real data). Point "
        "DATA_PATH at your own file to train on it",
        path,
        " and ".join(str(p) for p in written),
    )


# ---- clean and remove-run -------------------------------------------------------------------------


def clean_plan(root: Path = Path(".")) -> tuple[list[Path], list[str]]:
    """(paths to remove, notes on what is kept and why) for ``make clean``."""
    remove: list[Path] = [root / "models" / name for name in TINY_MODELS if (root / "models" / name).exists()]
    tokens = root / TOKEN_CACHE  # kept whole if someone's files are in it
    remove += [
        c for c in (root / name for name in CACHES) if c.exists() and not (c == tokens and ownership.foreign_entries(c))
    ]
    remove += _pycaches(root)
    kept: list[str] = []
    for manifest in sorted(root.glob("data/**/" + MANIFEST)):
        folder = manifest.parent
        for name, (_, kind) in sorted(generated.recorded(folder).items()):
            path = folder / name
            if not path.exists() or kind != generated.SAMPLE:
                continue  # predictions cost a model run: never cleaned
            if generated.is_unchanged(path, generated.SAMPLE):
                remove.append(path)
            else:
                kept.append(f"kept {path}: changed since the tool wrote it (your data now)")
    models = root / "models"
    runs = (
        [
            p
            for p in models.iterdir()
            if p.is_dir()
            and p not in remove
            and p.name not in TINY_MODELS
            and (ownership.kind_of(p) == "train" or (p / "adapter_config.json").is_file())
        ]
        if models.is_dir()
        else []
    )
    if runs:
        kept.append(
            "kept trained runs: "
            + ", ".join(str(r) for r in sorted(runs))
            + " (remove one with `make remove-run OUTPUT_DIR=<dir>`)"
        )
    return remove, kept


def _pycaches(root: Path) -> list[Path]:
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".venv", ".git"))]  # the venv's own caches stay
        found += [Path(folder) / d for d in dirs if d == "__pycache__"]
    return sorted(found)


def clean(root: Path = Path(".")) -> list[Path]:
    """Remove what clean_plan lists; log each path and each note. Returns the removed paths.
    Refused while a command is writing a run under models/: it may be reading a tiny model."""
    from app.training.runlock import busy_line, holder

    models = root / "models"
    for run in sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []:
        who = holder(run)
        if who is not None:
            raise UserError(
                busy_line(
                    "OUTPUT_DIR",
                    run,
                    who,
                    "make clean (it removes the tiny models and sample data such a run may be reading)",
                )
            )
    remove, kept = clean_plan(root)
    for path in remove:
        if path.name != "__pycache__":  # dozens of them: counted below, not listed
            log.info("removing %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in {p.parent for p in remove if p.parent.joinpath(MANIFEST).is_file()}:
        generated.write_manifest(folder, {k: v for k, v in generated.recorded(folder).items() if (folder / k).exists()})
    for note in kept:
        log.info("%s", note)
    caches = sum(p.name == "__pycache__" for p in remove)
    if caches:
        log.info("removed %d __pycache__ dirs", caches)
    if not remove:
        log.info("nothing to clean")
    return remove
