"""Raw records from a data file, a dataset directory or the hub: one pass, never the whole file in memory.

Each source yields ``(line, record-or-Exception)``; line numbers are 1-based as an editor shows
them (a dataset's row number for directories and hub datasets). JSONL and TXT are read as bytes
and decoded per line: a 20 GB file costs what one line costs. A .json array cannot stream, so a
large one is refused with the conversion to .jsonl. A bar (MB/s, records/s, ETA) shows progress on
files big enough to take a while.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.core.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
DATASET_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
PROGRESS_MB = 64  # smaller files read in a blink: no bar
JSON_ARRAY_MAX_MB = 512  # a .json array is parsed whole; beyond this, ask for JSONL
_BOM = b"\xef\xbb\xbf"
_TICK = 4096  # records between progress updates
_SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of a data file


def iter_source(
    path: str | Path, setting: str, shuffle_seed: int | None = None, take: int | None = None
) -> Iterator[tuple[int, Any]]:
    """The records of DATA_PATH-like ``path`` (a file, a dataset directory, or a hub name).

    ``shuffle_seed``/``take``: for datasets (directories, hub) only, read ``take`` records through a
    shuffle buffer instead of the whole dataset (files are sampled exactly by the caller instead)."""
    p = Path(path)
    if p.is_dir():
        return _iter_dataset(str(p), setting, dataset_files(p, setting), shuffle_seed, take)
    if not p.exists():
        if HUB_NAME.match(str(path)) and p.suffix.lower() not in SUFFIXES:
            return _iter_dataset(str(path), setting, None, shuffle_seed, take)
        raise UserError(
            f"{setting}={path}: no such file; run `make data` for the sample data "
            "or point it at your .jsonl/.json/.csv/.txt file"
        )
    return _iter_file(p, setting)


def is_dataset(path: str | Path) -> bool:
    """A dataset directory or a hub name (read through `datasets`), not a file."""
    p = Path(path)
    return p.is_dir() or (not p.exists() and bool(HUB_NAME.match(str(path))) and p.suffix.lower() not in SUFFIXES)


def _iter_file(p: Path, setting: str) -> Iterator[tuple[int, Any]]:
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{setting}={p}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .txt")
    size = p.stat().st_size
    with _Progress(p, size) as bar:
        try:
            if suffix == ".json":
                yield from _json_array(p, size, setting)
            elif suffix == ".csv":
                yield from _csv(p, bar)
            else:
                for n, rec, _ in _lines(p, suffix, bar, setting):
                    yield n, rec
        except UnicodeDecodeError:  # .jsonl/.txt name their line themselves
            raise UserError(
                f"{setting}={p}: line {_first_undecodable_line(p)} is not UTF-8 text; save the file "
                "as UTF-8 (Excel: CSV UTF-8; iconv -f GBK -t UTF-8)"
            ) from None


def iter_lines(path: str | Path, setting: str, progress: bool = True) -> Iterator[tuple[int, Any, int]]:
    """(line, record-or-Exception, byte offset of the line) of a .jsonl/.txt file: what the token cache
    records, so it can read a record again without a pass."""
    p = Path(path)
    with _Progress(p, p.stat().st_size if progress else 0) as bar:
        yield from _lines(p, p.suffix.lower(), bar, setting)


def _lines(p: Path, suffix: str, bar: _Progress, setting: str) -> Iterator[tuple[int, Any, int]]:
    jsonl, at = suffix == ".jsonl", 0
    with p.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            start, at = at, at + len(raw)
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not n % _TICK:
                bar.update(at, n)
            if raw.isspace():
                continue
            try:
                if jsonl:
                    yield n, _json_line(raw.decode("utf-8")), start
                else:
                    yield n, {"text": raw.decode("utf-8").rstrip("\r\n").replace("\\n", "\n")}, start
            except UnicodeDecodeError:
                raise UserError(
                    f"{setting}={p}: line {n} is not UTF-8 text; save the file as UTF-8 "
                    "(Excel: CSV UTF-8; iconv -f GBK -t UTF-8)"
                ) from None


# the C scanner json.loads ends in, without its checks per call (set by JSONDecoder(), unknown to typeshed)
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_line(text: str) -> Any:
    """One JSONL record, or ValueError("bad JSON"). The fast path parses a line that starts with its value
    and ends right after it (all but hand-edited files); anything else goes through json.loads."""
    try:
        value, end = _scan_json(text, 0)
        if end == len(text) or text[end:].isspace():
            return value
    except (StopIteration, json.JSONDecodeError):
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ValueError("bad JSON")


def _json_array(p: Path, size: int, setting: str) -> Iterator[tuple[int, Any]]:
    if size > JSON_ARRAY_MAX_MB * 2**20:
        raise UserError(
            f"{setting}={p}: a {size / 2**30:.1f} GB .json array must be parsed whole, in several times "
            "its size of memory; convert it to JSON Lines, which streams: "
            f"jq -c '.[]' {p} > {p.with_suffix('.jsonl')}"
        )
    try:
        data = json.loads(p.read_bytes().removeprefix(_BOM))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{setting}={p}: not valid JSON ({e.msg} at line {e.lineno}); "
            "a .json file must hold one array of records (use .jsonl for one per line)"
        ) from None
    if not isinstance(data, list):
        raise UserError(
            f"{setting}={p}: a .json file must hold an array of records, "
            f"found {type(data).__name__}; use .jsonl for one record per line"
        )
    yield from enumerate(data, 1)


def _csv(p: Path, bar: _Progress) -> Iterator[tuple[int, Any]]:
    with p.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        start = 2  # a quoted value may span lines: report the line the record starts on
        for i, row in enumerate(reader, 1):
            if not i % _TICK:
                bar.update(raw.tell(), i)
            if None in row:
                yield start, ValueError("extra CSV columns")
            elif any(v for v in row.values()):
                yield start, {k: v for k, v in row.items() if k}
            start = reader.line_num + 1


def _first_undecodable_line(path: Path) -> int:
    """1-based line of the first bytes that are not UTF-8 (a decoder's offset is per buffer, not per file)."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 1


def dataset_files(p: Path, setting: str) -> dict[str, list[str]]:
    """A local dataset directory's shards, by `datasets` builder (json, parquet, csv): one kind per directory."""
    files: dict[str, list[str]] = {}
    for f in sorted(p.rglob("*")):
        kind = DATASET_FILES.get(f.suffix.lower())
        if kind and f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
            files.setdefault(kind, []).append(str(f))
    if len(files) != 1:
        found = ", ".join(f"{len(v)} {k}" for k, v in files.items()) or "no .jsonl/.json/.parquet/.csv files"
        raise UserError(
            f"{setting}={p} is a directory with {found}; point it at a data file, or at a dataset "
            "directory of one kind of shards (.jsonl/.json, .parquet or .csv)"
        )
    return files


def _iter_dataset(
    name: str, setting: str, files: dict[str, list[str]] | None, shuffle_seed: int | None, take: int | None
) -> Iterator[tuple[int, Any]]:
    """A dataset's train split through `datasets` streaming (HF_ENDPOINT / HF cache respected): rows arrive as
    they are read, a shuffle buffer and ``take`` sample a large one without downloading all of it."""
    if files is None:
        from app.core.hub import go_offline_if_hub_unreachable

        go_offline_if_hub_unreachable(name)
    try:
        from datasets import load_dataset

        if files:
            ((kind, paths),) = files.items()
            ds = load_dataset(kind, data_files={"train": paths}, split="train", streaming=True)
        else:
            ds = load_dataset(name, split="train", streaming=True)
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed, buffer_size=max(10_000, 2 * (take or 0)))
        if take is not None:
            ds = ds.take(take)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # offline, unknown name, gated, unreadable shard...: one line, not a traceback
        what = "dataset directory" if files else "hub dataset"
        raise UserError(
            f"{setting}={name}: could not load this {what} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}); check the name and network, "
            "or download it and point DATA_PATH at the file"
        ) from e
    if first is None:
        return
    yield 1, dict(first)
    for i, row in enumerate(rows, 2):
        yield i, dict(row)


class _Progress:
    """A tqdm bar over a file's bytes (MB/s and ETA) with records/s, only for files over PROGRESS_MB."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.bar = path, size, None

    def __enter__(self) -> _Progress:
        if self.size >= PROGRESS_MB * 2**20:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.size,
                desc=f"reading {self.path.name}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                mininterval=1.0,
                dynamic_ncols=True,
            )
        return self

    def update(self, done: int, records: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            elapsed = self.bar.format_dict["elapsed"]
            self.bar.set_postfix_str(f"{records / max(elapsed, 1e-9):,.0f} records/s", refresh=False)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            if exc[0] is None:
                self.bar.update(self.size - self.bar.n)
            self.bar.close()


def fingerprint(path: str) -> dict[str, Any] | None:
    """Size and a hash of three 1 MB samples: a changed file is told apart in milliseconds, even
    at 20 GB (a same-size edit outside the samples is not; the path and size catch most). None
    for a hub dataset name."""
    p = Path(path)
    if not path or not p.is_file():
        return None
    st = p.stat()
    return dict(_fingerprint(str(p.resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _fingerprint(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, Any], ...]:
    """Read once per file version: the pre-flight, setup() and the checkpoints' settings all ask."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            fh.seek(at)
            h.update(fh.read(_SAMPLE))
    return (("size", size), ("sha256", h.hexdigest()))
