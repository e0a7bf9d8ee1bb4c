"""Read training data in any of the usual shapes and normalise it to chat messages.

Files: .jsonl, .json (an array), .csv (header row), .txt (one sample per line), a dataset
directory of shards, or a hub dataset name (app/data/record_sources.py reads them, one pass).
Records: ``{context, target}`` (the triplet tutorials), alpaca ``{instruction, input, output}``,
``{text}``, chat ``{messages}`` and sharegpt ``{conversations}``; for preference tuning, pairs
with ``chosen``/``rejected`` answers and KTO's ``{prompt, completion, label}``
(app/data/preference_records.py reads their shapes). The format is detected per file from the
first readable record.

Bad records are skipped and counted by line number; a file with no valid record, or with
more than MAX_BAD_RATIO bad ones, stops the run with one line before anything is written.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import UserError
from app.data.preference_records import PREFERENCE_FORMATS, SHAREGPT_ROLES, read_preference, turns
from app.data.preference_records import text_field as _str
from app.data.record_sources import is_dataset, iter_source

log = logging.getLogger(__name__)

FORMATS = ("context_target", "alpaca", "text", "messages", "sharegpt") + PREFERENCE_FORMATS
BAD_KEPT = 1000  # bad records remembered by line: a 20 GB file's may be millions; all are counted


@dataclass
class Example:
    """One sample: a conversation whose assistant turns are trained on, or raw text.

    A preference pair is the conversation ending in the chosen answer, plus ``rejected``, the worse
    answer to the same prompt; a KTO record is the conversation ending in its answer, plus ``label``
    (good or bad). Both keep ``messages`` as SFT's, so sampling, splits and F1 read them unchanged."""

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    line: int = 0
    rejected: str | None = None
    label: bool | None = None

    @property
    def kind(self) -> str:
        """The record's kind: pair (DPO), kto or sft."""
        return "pair" if self.rejected is not None else "kto" if self.label is not None else "sft"

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the final answer (what predict feeds the model)."""
        return self.messages[:-1] if self.messages and self.messages[-1]["role"] == "assistant" else self.messages

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


@dataclass
class LoadReport:
    source: str
    format: str
    total: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, why): the first BAD_KEPT
    bad_count: int = 0
    reasons: Counter = field(default_factory=Counter)

    def skip(self, line: int, why: str) -> None:
        self.bad_count += 1
        self.reasons[why] += 1
        if len(self.bad) < BAD_KEPT:
            self.bad.append((line, why))

    @property
    def valid(self) -> int:
        return self.total - self.bad_count

    def first_bad(self, n: int = 3) -> str:
        """The first bad records as "line 2: bad JSON; line 5: missing field 'target'", for one-line errors."""
        s = "; ".join(f"line {line}: {why}" for line, why in self.bad[:n])
        return s + (f"; {self.bad_count - n} more" if self.bad_count > n else "")

    def summary(self) -> str:
        s = f"{self.source}: {self.valid}/{self.total} valid records ({self.format})"
        if self.bad_count:
            s += "; skipped " + ", ".join(f"{n} {r}" for r, n in self.reasons.most_common())
            s += " (lines " + ", ".join(str(n) for n, _ in self.bad[:8]) + ("…" if self.bad_count > 8 else "") + ")"
        return s


# ---- reading ---------------------------------------------------------------------------------


def detect_format(rec: dict[str, Any]) -> str | None:
    keys = set(rec)  # answer fields may be absent (prediction inputs); to_example checks them
    if {"chosen", "rejected"} <= keys:  # first: LLaMA-Factory's pairs also hold conversations/instruction
        return "preference"
    if {"completion", "label"} <= keys:
        return "kto"
    if "context" in keys:
        return "context_target"
    if "instruction" in keys:
        return "alpaca"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "text" in keys:
        return "text"
    return None


def to_example(rec: Any, fmt: str, line: int = 0) -> Example:
    """Normalise one raw record; raises ValueError with a short reason if it is unusable."""
    if isinstance(rec, Exception):
        raise rec
    if not isinstance(rec, dict):
        raise ValueError("not an object")
    if fmt == "context_target":
        msgs = [
            {"role": "user", "content": _str(rec, "context")},
            {"role": "assistant", "content": _str(rec, "target")},
        ]
    elif fmt == "alpaca":
        user = _str(rec, "instruction")
        if _str(rec, "input", required=False).strip():
            user += "\n" + _str(rec, "input", required=False)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _str(rec, "output")}]
        if _str(rec, "system", required=False).strip():
            msgs.insert(0, {"role": "system", "content": _str(rec, "system")})
    elif fmt == "messages":
        msgs = turns(rec.get("messages"), "role", "content", None)
    elif fmt == "sharegpt":
        msgs = turns(rec.get("conversations"), "from", "value", SHAREGPT_ROLES)
    elif fmt in PREFERENCE_FORMATS:
        msgs, extra = read_preference(rec, fmt)
        _check_turns(msgs)
        return Example(messages=msgs, line=line, **extra)
    elif fmt == "text":
        text = _str(rec, "text")
        if not text.strip():
            raise ValueError("empty text")
        return Example(text=text, line=line)
    else:
        raise UserError(f"DATA_FORMAT={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    _check_turns(msgs)
    return Example(messages=msgs, line=line)


def _check_turns(msgs: list[dict[str, str]]) -> None:
    if msgs[-1]["role"] != "assistant":
        raise ValueError("last turn is not the assistant's")
    if not msgs[-1]["content"].strip():
        raise ValueError("empty answer")
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise ValueError("empty prompt")


def read_examples(
    path: str | Path,
    fmt: str = "auto",
    max_bad_ratio: float = 1.0,
    setting: str = "DATA_PATH",
    limit: int | None = None,
    warn: bool = True,
) -> tuple[list[Example], LoadReport]:
    """Every valid record of a file (or dataset), in file order, skipping and counting bad ones.

    ``limit``: read only the first records (a quick look: the bad-record ratio is then not judged,
    since it is a property of the whole file). ``warn``: log the skipped records."""
    raw = iter_source(path, setting)
    examples: list[Example] = []
    report = _scan(raw if limit is None else itertools.islice(raw, limit), fmt, str(path), setting, examples.append)
    judge(report, setting, max_bad_ratio if limit is None else None, warn)
    return examples, report


def sample_examples(
    path: str | Path,
    k: int | None,
    seed: int,
    fmt: str = "auto",
    max_bad_ratio: float = 1.0,
    setting: str = "DATA_PATH",
) -> tuple[list[Example], LoadReport]:
    """MAX_SAMPLES=``k`` of the valid records (None: all), uniformly at random and reproducibly for ``seed``, in
    a random order: one pass, in memory for ``k`` records whatever the file's size.

    Each valid record gets a random key, drawn in file order; the ``k`` smallest keys are kept (a bounded
    heap) and returned by key. A dataset directory or hub dataset is read through a shuffle buffer up to
    ``k`` records instead (`datasets` streaming), so a 0.5M-row dataset is not read whole for 1000."""
    rng = random.Random(seed)
    heap: list[tuple[float, int, Example]] = []  # (-key, n, example), the largest kept key on top

    def keep(ex: Example) -> None:
        item = (-rng.random(), len(heap), ex)
        if k is None or len(heap) < k:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:  # a smaller key than the largest kept one
            heapq.heapreplace(heap, item)

    raw = iter_source(path, setting, *((seed, k) if k is not None and is_dataset(path) else (None, None)))
    report = _scan(raw, fmt, str(path), setting, keep)
    judge(report, setting, max_bad_ratio, True)
    return [ex for *_, ex in sorted(heap, reverse=True)], report


def split(pool: list[Example], val_size: float, has_val_file: bool) -> tuple[list[Example], list[Example]]:
    """Hold out a validation split (VAL_SIZE of the pool, at most 200) unless VAL_PATH gives one: the pool's
    first records, which sample_examples left in a random order."""
    if has_val_file or val_size <= 0 or len(pool) < 10:
        return pool, []
    n_val = min(200, max(1, round(len(pool) * val_size)))
    return pool[n_val:], pool[:n_val]


def _scan(
    raw: Iterator[tuple[int, Any]], fmt: str, source: str, setting: str, keep: Callable[[Example], None]
) -> LoadReport:
    report = LoadReport(source, fmt)
    for ex, _ in examples_of(raw, fmt, source, setting, report):
        keep(ex)
    return report


def examples_of(
    raw: Iterator[tuple[Any, ...]], fmt: str, source: str, setting: str, report: LoadReport
) -> Iterator[tuple[Example, tuple[Any, ...]]]:
    """Each valid record of ``raw`` ((line, record, *extra) tuples) as (Example, extra), the format detected from
    the first record when ``fmt`` is auto; bad records are counted in ``report``."""
    first_fmt = None if fmt == "auto" else fmt
    for line, rec, *extra in raw:
        report.total += 1
        if first_fmt is None and isinstance(rec, dict):
            first_fmt = detect_format(rec)
            if first_fmt is None:
                raise UserError(
                    f"{setting}={source}: line {line}: cannot tell the record format from fields "
                    f"{sorted(rec)[:6]}; use context/target, instruction/output, text, "
                    "messages, conversations, prompt/chosen/rejected or prompt/completion/label, "
                    "or set DATA_FORMAT"
                )
            report.format = first_fmt
        try:
            yield to_example(rec, first_fmt or fmt, line), tuple(extra)
        except ValueError as e:
            report.skip(line, str(e))


def judge(report: LoadReport, setting: str, max_bad_ratio: float | None, warn: bool) -> None:
    """One line for a file with no records, none valid, or (``max_bad_ratio``) too many bad ones."""
    path = report.source
    if report.bad_count and warn:
        log.warning("%s", report.summary())
    if not report.total:
        raise UserError(
            f"{setting}={path}: the file holds no records (it is empty); point {setting} at your "
            "data, or run `make data` for the sample data"
        )
    if not report.valid:
        raise UserError(f"{setting}={path}: no valid records ({report.summary()}); fix the file or DATA_FORMAT")
    if max_bad_ratio is not None and report.bad_count / report.total > max_bad_ratio:
        raise UserError(
            f"{setting}={path}: {report.bad_count} of {report.total} records are bad, more than "
            f"MAX_BAD_RATIO={max_bad_ratio} ({report.first_bad()}); fix those lines or raise "
            "MAX_BAD_RATIO"
        )


# ---- preference tuning: which STAGE a file's records fit ----------------------------------------------------

_STAGE_OF_FORMAT = {"preference": "dpo", "kto": "kto"}
_WHAT = {"sft": "sft records", "dpo": "preference pairs", "kto": "kto records"}


def stage_of_format(fmt: str) -> str:
    """The STAGE a record format trains: "dpo" for pairs, "kto" for labelled answers, else "sft"."""
    return _STAGE_OF_FORMAT.get(fmt, "sft")


def check_stage(report: LoadReport, stage: str, setting: str = "DATA_PATH") -> bool:
    """Refuse, in one line, records that STAGE cannot train on. True when they are pairs, which STAGE=kto
    trains as one good and one bad record each (``unpair``, as TRL's unpair_preference_dataset): the caller
    says so once (this runs for each split)."""
    have = stage_of_format(report.format)
    if have == stage:
        return False
    if stage == "kto" and have == "dpo":
        return True
    where = f"{setting}={report.source} holds {_WHAT[have]} ({report.format})"
    if stage == "dpo":
        raise UserError(
            f"{where}; STAGE=dpo needs prompt/chosen/rejected pairs (or LLaMA-Factory's "
            f"conversations+chosen/rejected); run `make data STAGE=dpo` for sample pairs, or set "
            f"STAGE={have}"
        )
    if stage == "kto":
        raise UserError(
            f"{where}; STAGE=kto needs prompt/completion/label records or preference pairs; run "
            "`make data STAGE=kto` for sample records, or set STAGE=sft"
        )
    raise UserError(
        f"{where}; STAGE=sft trains on single answers: set STAGE={have} to train on them"
        + (" (or STAGE=kto)" if have == "dpo" else "")
        + f", or point {setting} at SFT data"
    )


def unpair(examples: list[Example]) -> list[Example]:
    """Each preference pair as two KTO records, its chosen answer good and its rejected one bad, in order;
    other records as they are."""
    out = []
    for ex in examples:
        if ex.rejected is None:
            out.append(ex)
            continue
        bad = ex.prompt_messages + [{"role": "assistant", "content": ex.rejected}]
        out += [
            Example(messages=ex.messages, line=ex.line, label=True),
            Example(messages=bad, line=ex.line, label=False),
        ]
    return out
