"""The records a run holds out for validation: split once by training, rebuilt later by evaluation.

Training (app/training/prepare.py) splits through these functions and the token cache's split, and records
in data_report.json a digest of what it held out; `make evaluate` (app/evaluation/dataset.py) calls the same
functions with the run's saved settings (DATA_PATH, SEED, MAX_SAMPLES, VAL_SIZE, DATA_FORMAT), without
tokenizing, and compares the digest: it scores exactly the records the run never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.data.cache import find_cache, held_out_rows, uses_cache
from app.data.record_sources import iter_lines
from app.data.records import Example, LoadReport, examples_of, sample_examples, split


def sampled_split(d: Any, seed: int) -> tuple[list[Example], list[Example], LoadReport]:
    """(training, validation, report): MAX_SAMPLES of DATA_PATH's records sampled with SEED, then VAL_SIZE of
    them held out (none with a VAL_PATH). ``d``: the DataArgs."""
    pool, report = sample_examples(d.data_path, d.max_samples, seed, d.data_format, d.max_bad_ratio, "DATA_PATH")
    train, val = split(pool, d.val_size, bool(d.val_path))
    return train, val, report


def held_out(d: Any, seed: int, cache: str | None = None) -> list[Example]:
    """The validation split a run with data settings ``d`` and SEED held out of DATA_PATH, in its order (empty
    with a VAL_PATH). ``cache``: the token cache that run read (MAX_SAMPLES=all of a .jsonl/.txt), given only
    when the data file is unchanged since, since it locates records by byte offset; without it the split is
    rebuilt from the file itself."""
    if d.val_path:
        return []
    if not uses_cache(d.data_path, d.max_samples):
        return sampled_split(d, seed)[1]
    found = find_cache(Path(cache)) if cache else None
    if found is not None:
        return [found.example(d.data_path, int(i)) for i in found.split(seed, d.val_size, False)[1]]
    return _cached_split_from_file(d, seed)


def _cached_split_from_file(d: Any, seed: int) -> list[Example]:
    """The token cache's rows are the file's valid records in file order (each has a label token: an answer or a
    {text} is never empty, and EOS follows it), so held_out_rows over their count picks the same records. Two
    passes, holding only the picked records: the file may be larger than memory."""

    def records() -> Iterator[Example]:
        report = LoadReport(d.data_path, d.data_format)
        raw = iter_lines(d.data_path, "DATA_PATH", progress=False)
        return (ex for ex, _ in examples_of(raw, d.data_format, d.data_path, "DATA_PATH", report))

    rows = held_out_rows(sum(1 for _ in records()), seed, d.val_size, False)
    where = {int(row): k for k, row in enumerate(rows)}
    picked: list[Any] = [None] * len(rows)
    for i, ex in enumerate(records()):
        if i in where:
            picked[where[i]] = ex
    return picked


def digest(examples: list[Example]) -> str:
    """A short hash of what these records hold (not where they are): data_report.json's identity of the
    held-out records, which an evaluation's rebuilt split must match."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps(e.messages or e.text, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:16]
