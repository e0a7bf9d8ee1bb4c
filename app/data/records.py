"""Read training data in any of the usual shapes and normalise it to chat messages.

Files: .jsonl, .json (an array), .csv (header row), .txt (one sample per line), or a hub
dataset name. Records: ``{context, target}`` (the triplet tutorials), alpaca
``{instruction, input, output}``, ``{text}``, chat ``{messages}`` and sharegpt
``{conversations}``. The format is detected per file from the first readable record.

Bad records are skipped and counted by line number; a file with no valid record, or with
more than MAX_BAD_RATIO bad ones, stops the run with one line before anything is written.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from app.core.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("context_target", "alpaca", "text", "messages", "sharegpt")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Example:
    """One sample: a conversation whose assistant turns are trained on, or raw text."""

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    line: int = 0

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
    bad: list[tuple[int, str]] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.total - len(self.bad)

    def first_bad(self, n: int = 3) -> str:
        """The first bad records as "line 2: bad JSON; line 5: missing field 'target'", for one-line errors."""
        s = "; ".join(f"line {line}: {why}" for line, why in self.bad[:n])
        return s + (f"; {len(self.bad) - n} more" if len(self.bad) > n else "")

    def summary(self) -> str:
        s = f"{self.source}: {self.valid}/{self.total} valid records ({self.format})"
        if self.bad:
            reasons = Counter(r for _, r in self.bad)
            s += "; skipped " + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            s += " (lines " + ", ".join(str(n) for n, _ in self.bad[:8]) + ("…" if len(self.bad) > 8 else "") + ")"
        return s


# ---- reading ---------------------------------------------------------------------------------

def _iter_raw(path: Path, setting: str) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, record-or-Exception). Line numbers are 1-based as an editor shows them."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError:
                        yield n, ValueError("bad JSON")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise UserError(f"{setting}={path}: not valid JSON ({e.msg} at line {e.lineno}); "
                            "a .json file must hold one array of records (use .jsonl for one per line)") from None
        if not isinstance(data, list):
            raise UserError(f"{setting}={path}: a .json file must hold an array of records, "
                            f"found {type(data).__name__}; use .jsonl for one record per line")
        yield from enumerate(data, 1)
    elif suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            start = 2  # a quoted value may span lines: report the line the record starts on
            for row in reader:
                if None in row:
                    yield start, ValueError("extra CSV columns")
                elif any(v for v in row.values()):
                    yield start, {k: v for k, v in row.items() if k}
                start = reader.line_num + 1
    elif suffix == ".txt":
        with path.open(encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield n, {"text": line.rstrip("\n").replace("\\n", "\n")}
    else:
        raise UserError(f"{setting}={path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .txt")


def detect_format(rec: dict[str, Any]) -> str | None:
    keys = set(rec)  # answer fields may be absent (prediction inputs); to_example checks them
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


def _str(rec: dict[str, Any], key: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(v, (str, int, float)):
        raise ValueError(f"field '{key}' is not text")
    return str(v)


def _turns(items: Any, role_key: str, text_key: str, roles: dict[str, str] | None) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise ValueError("empty conversation")
    msgs = []
    for t in items:
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise ValueError(f"turn without '{role_key}'/'{text_key}'")
        if not isinstance(t[text_key], (str, int, float)):  # e.g. null content of a tool-call turn
            raise ValueError(f"'{text_key}' is not text")
        role = str(t[role_key]).lower()
        role = roles.get(role, "") if roles else role
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {t[role_key]!r}")
        msgs.append({"role": role, "content": str(t[text_key])})
    return msgs


def to_example(rec: Any, fmt: str, line: int = 0) -> Example:
    """Normalise one raw record; raises ValueError with a short reason if it is unusable."""
    if isinstance(rec, Exception):
        raise rec
    if not isinstance(rec, dict):
        raise ValueError("not an object")
    if fmt == "context_target":
        msgs = [{"role": "user", "content": _str(rec, "context")},
                {"role": "assistant", "content": _str(rec, "target")}]
    elif fmt == "alpaca":
        user = _str(rec, "instruction")
        if _str(rec, "input", required=False).strip():
            user += "\n" + _str(rec, "input", required=False)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _str(rec, "output")}]
        if _str(rec, "system", required=False).strip():
            msgs.insert(0, {"role": "system", "content": _str(rec, "system")})
    elif fmt == "messages":
        msgs = _turns(rec.get("messages"), "role", "content", None)
    elif fmt == "sharegpt":
        msgs = _turns(rec.get("conversations"), "from", "value", _SHAREGPT_ROLES)
    elif fmt == "text":
        text = _str(rec, "text")
        if not text.strip():
            raise ValueError("empty text")
        return Example(text=text, line=line)
    else:
        raise UserError(f"DATA_FORMAT={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    if msgs[-1]["role"] != "assistant":
        raise ValueError("last turn is not the assistant's")
    if not msgs[-1]["content"].strip():
        raise ValueError("empty answer")
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise ValueError("empty prompt")
    return Example(messages=msgs, line=line)


def read_examples(path: str | Path, fmt: str = "auto", max_bad_ratio: float = 1.0,
                  setting: str = "DATA_PATH", limit: int | None = None,
                  warn: bool = True) -> tuple[list[Example], LoadReport]:
    """Read a file (or hub dataset) into Examples, skipping and counting bad records.

    ``limit``: read only the first records (a quick look: the bad-record ratio is then not judged,
    since it is a property of the whole file). ``warn``: log the skipped records."""
    p = Path(path)
    if not p.exists():
        if _HUB_NAME.match(str(path)) and p.suffix.lower() not in (".jsonl", ".json", ".csv", ".txt"):
            raw: Iterator[tuple[int, Any]] = _iter_hub(str(path), setting)
        else:
            raise UserError(f"{setting}={path}: no such file; run `make data` for the sample data "
                            "or point it at your .jsonl/.json/.csv/.txt file")
    elif p.is_dir():
        raise UserError(f"{setting}={path} is a directory; point it at a data file")
    else:
        raw = _iter_raw(p, setting)
    if limit is not None:
        raw = itertools.islice(raw, limit)
    try:
        examples, report = _collect(raw, fmt, str(path), setting)
    except UnicodeDecodeError:
        line = _first_undecodable_line(p)
        raise UserError(f"{setting}={path}: line {line} is not UTF-8 text; save the file as UTF-8 "
                        "(Excel: CSV UTF-8; iconv -f GBK -t UTF-8)") from None
    if report.bad and warn:
        log.warning("%s", report.summary())
    if not report.total:
        raise UserError(f"{setting}={path}: the file holds no records (it is empty); point {setting} at your "
                        "data, or run `make data` for the sample data")
    if not examples:
        raise UserError(f"{setting}={path}: no valid records ({report.summary()}); fix the file or DATA_FORMAT")
    if limit is None and len(report.bad) / report.total > max_bad_ratio:
        raise UserError(f"{setting}={path}: {len(report.bad)} of {report.total} records are bad, more than "
                        f"MAX_BAD_RATIO={max_bad_ratio} ({report.first_bad()}); fix those lines or raise "
                        "MAX_BAD_RATIO")
    return examples, report


def _first_undecodable_line(path: Path) -> int:
    """1-based line of the first bytes that are not UTF-8 (a decoder's offset is per buffer, not per file)."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 1


def _collect(raw: Iterator[tuple[int, Any]], fmt: str, source: str, setting: str
             ) -> tuple[list[Example], LoadReport]:
    report, examples, first_fmt = LoadReport(source, fmt), [], None
    for line, rec in raw:
        report.total += 1
        if fmt == "auto" and first_fmt is None and isinstance(rec, dict):
            first_fmt = detect_format(rec)
            if first_fmt is None:
                raise UserError(f"{setting}={source}: line {line}: cannot tell the record format from fields "
                                f"{sorted(rec)[:6]}; use context/target, instruction/output, text, "
                                "messages or conversations, or set DATA_FORMAT")
            report.format = first_fmt
        try:
            examples.append(to_example(rec, (first_fmt or fmt) if fmt == "auto" else fmt, line))
        except ValueError as e:
            report.bad.append((line, str(e)))
    return examples, report


def _iter_hub(name: str, setting: str) -> Iterator[tuple[int, Any]]:
    """A hub dataset's train split (HF_ENDPOINT / HF cache respected by `datasets`)."""
    from app.core.hub import go_offline_if_hub_unreachable

    go_offline_if_hub_unreachable(name)
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name, gated...: one line, not a traceback
        raise UserError(f"{setting}={name}: could not load this hub dataset ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); check the name and network, "
                        "or download it and point DATA_PATH at the file") from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


def sample_and_split(examples: list[Example], max_samples: int | None, val_size: float, seed: int,
                     has_val_file: bool) -> tuple[list[Example], list[Example]]:
    """Reproducibly sample MAX_SAMPLES (None = all), then hold out a validation split if no VAL_PATH."""
    rng = random.Random(seed)
    pool = list(examples)
    if max_samples is not None and len(pool) > max_samples:
        pool = rng.sample(pool, max_samples)
    else:
        rng.shuffle(pool)
    if has_val_file or val_size <= 0 or len(pool) < 10:
        return pool, []
    n_val = min(200, max(1, round(len(pool) * val_size)))
    return pool[n_val:], pool[:n_val]
