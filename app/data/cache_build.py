"""Building the token cache (app/data/cache.py): the file read once, in order, its records encoded whole by
NUM_PROC worker processes, the rows appended to flat files in a temporary folder that is renamed into place
only when complete. A worker encodes a chunk of records at once (app/data/encode_batch.py: one tokenizer call
for all their segments) and sends back numpy arrays, which are written a chunk at a time."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import UserError
from app.data.encode_batch import EncodedRows, encode_rows
from app.data.record_sources import iter_lines
from app.data.records import LoadReport, examples_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

VERSION = 1
FILES = ("ids", "mask", "offsets", "plen", "starts")
DTYPES = {"ids": "int32", "mask": "uint8", "offsets": "int64", "plen": "int32", "starts": "int64"}
_CHUNK = 512  # records per worker task
_PARALLEL_MB = 16  # smaller files are encoded in-process: starting workers would cost more
_STORED = 4 + 1  # bytes per token on disk (ids + mask)


def build(
    data_path: str, fmt: str, tokenizer: PreTrainedTokenizerBase, final: Path, num_proc: int, setting: str
) -> None:
    """Tokenize ``data_path`` into the cache folder ``final``: staged, then renamed whole. The caller holds the
    key's lock, so any temporary folder of this key is a killed build's."""
    import numpy as np

    size = Path(data_path).stat().st_size
    _check_disk(data_path, fmt, tokenizer, final.parent, size)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed build's debris: never read
    tmp.mkdir()
    report = LoadReport(data_path, fmt)
    out = {f: (tmp / f).open("wb") for f in FILES}
    offset = 0
    out["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
    try:
        for starts, rows in _encoded(data_path, fmt, tokenizer, num_proc, report, setting, size):
            # a chunk's rows in one write per file: per-row writes cost as much as the tokenizer's batched call
            out["ids"].write(rows.ids.tobytes())
            out["mask"].write(rows.mask.tobytes())
            out["offsets"].write((offset + np.cumsum(rows.lengths, dtype=np.int64)).tobytes())
            out["plen"].write(rows.plen.tobytes())
            out["starts"].write(np.asarray(starts, dtype=np.int64)[rows.kept].tobytes())
            offset += int(rows.lengths.sum())
    except BaseException:
        for fh in out.values():
            fh.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for fh in out.values():
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
    meta = {
        "version": VERSION,
        "data_path": data_path,
        "tokens": offset,
        "report": {
            "source": data_path,
            "format": report.format,
            "total": report.total,
            "bad": report.bad,
            "bad_count": report.bad_count,
            "reasons": dict(report.reasons),
        },
    }
    (tmp / "meta.json").write_text(json.dumps(meta))  # last: a folder with it is complete
    os.replace(tmp, final)


def _encoded(
    data_path: str,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    num_proc: int,
    report: LoadReport,
    setting: str,
    size: int,
) -> Iterator[tuple[list[int], EncodedRows]]:
    """(byte offsets, encoded rows) in chunks, in file order; bad records counted in ``report``. With workers,
    at most a few chunks per worker are in flight: the file is never read ahead of the encoding."""
    chunks = _chunks(data_path, fmt, report, setting)
    procs = num_proc or os.cpu_count() or 1
    if procs <= 1 or size < _PARALLEL_MB * 2**20:
        for starts, examples in chunks:
            yield starts, encode_rows(examples, tokenizer)
        return
    import multiprocessing as mp
    import threading

    in_flight = threading.Semaphore(4 * procs)

    def tasks() -> Iterator[tuple[list[int], list[Any]]]:
        for chunk in chunks:
            in_flight.acquire()  # released as each result is taken below
            yield chunk

    log.info("tokenizing %s with %d worker processes (NUM_PROC)", data_path, procs)
    with mp.get_context("spawn").Pool(procs, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        for starts, rows in pool.imap(_encode_in_worker, tasks(), chunksize=1):
            in_flight.release()
            yield starts, rows


def _chunks(
    data_path: str, fmt: str, report: LoadReport, setting: str, progress: bool = True
) -> Iterator[tuple[list[int], list[Any]]]:
    starts: list[int] = []
    examples: list[Any] = []
    for ex, (start,) in examples_of(iter_lines(data_path, setting, progress), fmt, data_path, setting, report):
        examples.append(ex)
        starts.append(start)
        if len(examples) == _CHUNK:
            yield starts, examples
            starts, examples = [], []
    if examples:
        yield starts, examples


_WORKER_TOKENIZER: PreTrainedTokenizerBase | None = None


def _init_worker(tokenizer: PreTrainedTokenizerBase) -> None:
    global _WORKER_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(chunk: tuple[list[int], list[Any]]) -> tuple[list[int], EncodedRows]:
    assert _WORKER_TOKENIZER is not None  # _init_worker, the pool's initializer, set it
    return chunk[0], encode_rows(chunk[1], _WORKER_TOKENIZER)  # numpy arrays back: a few bytes per token


def _check_disk(data_path: str, fmt: str, tokenizer: PreTrainedTokenizerBase, where: Path, size: int) -> None:
    """The cache's expected size, from the first records' tokens per byte, against free disk: one line if short."""
    first = next(_chunks(data_path, fmt, LoadReport(data_path, fmt), "DATA_PATH", progress=False), None)
    if first is None or len(first[0]) < 2:
        return
    starts, examples = first
    n = min(len(starts) - 1, 200)
    per_byte = encode_rows(examples[:n], tokenizer).lengths.sum() / max(1, starts[n] - starts[0])
    expected = size * per_byte * _STORED + size / max(1, starts[n] - starts[0]) * n * 24  # + per-row arrays
    free = shutil.disk_usage(where).free
    if expected * 1.1 > free:
        raise UserError(
            f"CACHE_DIR={where.parent}: the token cache of DATA_PATH={data_path} needs about "
            f"{expected / 2**30:.1f} GB and {free / 2**30:.1f} GB are free there; free disk space, point "
            "CACHE_DIR at a larger disk, or set MAX_SAMPLES to train on a sample"
        )
