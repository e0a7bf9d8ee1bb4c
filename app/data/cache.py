"""The token cache: a MAX_SAMPLES=all run's .jsonl/.txt data, tokenized once into flat files.

Why: tokenizing is ~1-3 MB/s per core, so a 20 GB file takes hours, and its rows as Python lists
take several times its size in RAM. Built once (NUM_PROC worker processes), a second run on the
same data starts in seconds, and training reads rows with pread (into the page cache, not this
process's memory): RSS stays flat as the file grows.

One folder per data file version and tokenizer, under CACHE_DIR/tokens/<key>: the key is the
file's fingerprint (size, a hash of its start, middle and end, and mtime), the tokenizer's
vocabulary and chat template, DATA_FORMAT and this layout's version. Rows are stored whole;
MAX_SEQ_LEN's truncation (app/data/encode.py) and the validation split (by SEED) are applied on
read, so changing either never rebuilds. Files: ids (int32 tokens), mask (uint8: 1 = trained on),
offsets (int64, one per row + 1), plen (int32: where the last answer starts), starts (int64: the
record's byte offset, to read a validation record again), meta.json last. A build writes into a
temporary folder and renames it whole: a killed build leaves nothing that is later trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core import diskspace, ownership
from app.core.errors import UserError
from app.data.cache_build import DTYPES, FILES, VERSION, build
from app.data.encode import IGNORE, EncodeStats, _truncate
from app.data.record_sources import fingerprint
from app.data.records import LoadReport, to_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHED_SUFFIXES = (".jsonl", ".txt")
CACHE_KIND = "token-cache"  # CACHE_DIR/tokens's kind of folder (app.core.ownership): only caches in it
CHUNK = 1 << 18  # rows per step over the per-row arrays (~10 MB of transient arrays)


def uses_cache(data_path: str, max_samples: int | None) -> bool:
    """MAX_SAMPLES=all on a .jsonl/.txt file: the sizes that outgrow memory come in these formats."""
    return max_samples is None and Path(data_path).suffix.lower() in CACHED_SUFFIXES and Path(data_path).is_file()


def cache_key(data_path: str, fmt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    fp = fingerprint(data_path) or {}
    st = Path(data_path).stat()
    ident = {
        "version": VERSION,
        "data": [str(Path(data_path).resolve()), fp, st.st_mtime_ns],
        "format": fmt,
        "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the tokens: the vocabulary and merges, the special tokens, the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(
        json.dumps(
            [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, type(tokenizer).__name__]
        ).encode()
    )
    return h.hexdigest()


@dataclass
class TokenCache:
    path: Path
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self.arrays = {f: Flat(self.path / f, DTYPES[f]) for f in FILES}

    def __len__(self) -> int:
        return len(self.arrays["offsets"]) - 1

    def _chunks(self) -> Iterator[tuple[int, Any, Any]]:
        """(first row, lengths, answer starts) of CHUNK rows at a time: per-row arrays are never whole in RAM."""
        import numpy as np

        for start in range(0, len(self), CHUNK):
            stop = min(len(self), start + CHUNK)
            yield start, np.diff(self.arrays["offsets"][start : stop + 1]), self.arrays["plen"][start:stop]

    def row(self, i: int, max_seq_len: int) -> dict[str, list[int]]:
        a, b = int(self.arrays["offsets"][i]), int(self.arrays["offsets"][i + 1])
        ids = self.arrays["ids"][a:b].tolist()
        labels = [t if m else IGNORE for t, m in zip(ids, self.arrays["mask"][a:b].tolist(), strict=True)]
        if len(ids) > max_seq_len:
            ids, labels, _ = _truncate(ids, labels, max_seq_len)
        return {"input_ids": ids, "labels": labels}

    def report(self) -> LoadReport:
        r = self.meta["report"]
        report = LoadReport(r["source"], r["format"], r["total"], [tuple(b) for b in r["bad"]], r["bad_count"])
        report.reasons.update(r["reasons"])
        return report

    def split(self, seed: int, val_size: float, has_val_file: bool) -> tuple[TrainRows, Any]:
        """(training rows, validation row indices): held_out_rows over this cache's rows."""
        import numpy as np

        val = held_out_rows(len(self), seed, val_size, has_val_file)
        return TrainRows(len(self), np.sort(val)), val

    def stats(self, max_seq_len: int, exclude: Any = ()) -> EncodeStats:
        """What encode_all would report for every row but ``exclude`` (the validation rows) at MAX_SEQ_LEN, from
        the stored lengths, no tokens read; ``lengths`` is a sample of 20k rows at most, for MAX_SEQ_LEN=auto."""
        import numpy as np

        def counts(lengths: Any, plen: Any) -> np.ndarray:
            over = lengths > max_seq_len
            cut = over & ((lengths - plen) + np.minimum(plen, 16) > max_seq_len)
            return np.array([len(lengths), np.minimum(lengths, max_seq_len).sum(), (over & ~cut).sum(), cut.sum()])

        total = sum((counts(lengths, plen) for _, lengths, plen in self._chunks()), np.zeros(4, dtype=np.int64))
        skip = np.sort(np.asarray(exclude, dtype=np.int64))
        offsets = self.arrays["offsets"]
        if len(skip):  # the validation rows' share, taken back out
            total -= counts(offsets[skip + 1] - offsets[skip], self.arrays["plen"][skip])
        rows = TrainRows(len(self), skip)
        pick = range(len(rows)) if len(rows) <= 20_000 else np.random.default_rng(0).integers(0, len(rows), 20_000)
        sample = [int(offsets[rows[i] + 1] - offsets[rows[i]]) for i in pick]
        samples, tokens, prompt_cut, answer_cut = map(int, total)
        return EncodeStats(samples, tokens, prompt_cut, answer_cut, sample)

    def example(self, data_path: str, i: int) -> Any:
        """Row ``i``'s record, read again from the data file at its byte offset (validation needs the messages)."""
        with open(data_path, "rb") as fh:
            fh.seek(int(self.arrays["starts"][i]))
            raw = fh.readline().removeprefix(b"\xef\xbb\xbf")
        rec = (
            json.loads(raw)
            if data_path.lower().endswith(".jsonl")
            else {"text": raw.decode("utf-8").rstrip("\r\n").replace("\\n", "\n")}
        )
        return to_example(rec, self.meta["report"]["format"], 0)


def held_out_rows(n: int, seed: int, val_size: float, has_val_file: bool) -> Any:
    """The validation rows of ``n`` cached rows, in SEED's key order: VAL_SIZE of them (at most 200), those with
    the smallest of SEED's random keys, as app/data/records.split holds them out; none with a VAL_PATH or under
    10 rows. The keys are drawn a chunk at a time, keeping only the smallest: memory does not grow with the rows.
    Evaluation rebuilds a run's split with it too (app/data/heldout.py)."""
    import numpy as np

    if has_val_file or val_size <= 0 or n < 10:
        return np.zeros(0, dtype=np.int64)
    n_val = min(200, max(1, round(n * val_size)))
    rng, keys, rows = np.random.default_rng(seed), np.zeros(0), np.zeros(0, dtype=np.int64)
    for start in range(0, n, CHUNK):
        k = rng.random(min(CHUNK, n - start))
        keys = np.concatenate([keys, k])
        rows = np.concatenate([rows, np.arange(start, start + len(k))])
        if len(keys) > n_val:
            keep = np.argpartition(keys, n_val - 1)[:n_val]
            keys, rows = keys[keep], rows[keep]
    return rows[np.argsort(keys, kind="stable")]


def cache_path(data_path: str, fmt: str, tokenizer: PreTrainedTokenizerBase, cache_dir: str) -> Path:
    """Where this file version's cache for this tokenizer lives (the key hashes the tokenizer: ask once)."""
    return Path(cache_dir) / "tokens" / cache_key(data_path, fmt, tokenizer)


def find_cache(final: Path) -> TokenCache | None:
    """The complete cache at ``final``, or None."""
    if not (final / "meta.json").is_file():
        return None
    return TokenCache(final, json.loads((final / "meta.json").read_text()))


def open_or_build(
    data_path: str,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str,
    num_proc: int,
    setting: str = "DATA_PATH",
    final: Path | None = None,
) -> TokenCache:
    """The cache for this file and tokenizer: found (a hit, logged) or built now. A build holds a lock on its key,
    so a second run on the same data (another OUTPUT_DIR, or a container) waits for it instead of clearing its
    temporary folder as a dead build's, and then finds the cache."""
    final = final or cache_path(data_path, fmt, tokenizer, cache_dir)
    cache = find_cache(final)
    if cache is None:
        tokens = final.parent
        problem = ownership.write_problem(tokens, "CACHE_DIR", CACHE_KIND, ownership.refused_why(tokens, {}))
        if problem:  # CACHE_DIR/tokens of someone's: the pre-flight says so too, with what the run reads
            raise UserError(problem)
        ownership.claim(final.parent, CACHE_KIND)
        ownership.register(final.parent, [final.name, f".{final.name}.lock"])
        with _key_lock(final):
            cache = find_cache(final)  # built while this run waited
            if cache is None:
                _build(data_path, fmt, tokenizer, final, num_proc, setting)
                cache = find_cache(final)
                assert cache is not None
                log.info(
                    "token cache built: %s (%s rows, %s tokens)", final, f"{len(cache):,}", f"{cache.meta['tokens']:,}"
                )
                return cache
    log.info(
        "token cache hit: %s (%s rows, %s tokens) for %s",
        cache.path,
        f"{len(cache):,}",
        f"{len(cache.arrays['ids']):,}",
        data_path,
    )
    return cache


def _build(
    data_path: str, fmt: str, tokenizer: PreTrainedTokenizerBase, final: Path, num_proc: int, setting: str
) -> None:
    """build(), with a disk that fills meanwhile told in one line (the partial cache is gone by then)."""
    try:
        build(data_path, fmt, tokenizer, final, num_proc, setting)
    except OSError as e:
        if not diskspace.is_full(e, final.parent):
            raise
        raise UserError(
            diskspace.full_line(
                "CACHE_DIR",
                final.parent.parent,
                f"building the token cache of {setting}={data_path}",
                None,
                "its partial files were removed and earlier caches are intact",
                "run the same command again",
            )
        ) from None


@contextmanager
def _key_lock(final: Path) -> Iterator[None]:
    """An flock on tokens/.<key>.lock, which its holder deletes before releasing it (nothing is left behind); so
    a waiter that wakes on a deleted file opens the path again."""
    import fcntl

    path = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building the token cache %s", final)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder deleted it before letting go: lock the path's current file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


class Flat:
    """One flat array file, read with pread. Its pages go to the page cache and never count as this process's RSS:
    a memmap's touched pages do, so a long run over a large cache would look to the memory guard like a leak of
    the cache's size."""

    def __init__(self, path: Path, dtype: str):
        import numpy as np

        self.path, self.dtype = path, np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY)
        self.n = os.fstat(self.fd).st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: Any) -> Any:
        import numpy as np

        if isinstance(key, slice):
            start, stop, _ = key.indices(self.n)
            size = self.dtype.itemsize
            return np.frombuffer(os.pread(self.fd, max(0, stop - start) * size, start * size), self.dtype)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.n if key < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(key)
            return self[i : i + 1][0]
        return np.array([self[int(k)] for k in np.asarray(key).ravel()], dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker or another rank opens its own descriptor
        return {"path": self.path, "dtype": str(self.dtype)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Flat.__init__(self, state["path"], state["dtype"])

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:  # -1: closed, or never opened
            os.close(self.fd)
            self.fd = -1


class TrainRows:
    """Row indices 0..n-1 without the sorted validation rows ``skip`` (a few hundred at most), computed per index
    instead of stored: a 20 GB file's 30M rows would otherwise be a 240 MB index."""

    def __init__(self, n: int, skip: Any):
        import numpy as np

        self.n, self.before = n, np.asarray(skip, dtype=np.int64) - np.arange(len(skip))  # training rows before each

    def __len__(self) -> int:
        return self.n - len(self.before)

    def __getitem__(self, i: int) -> int:
        import numpy as np

        if not 0 <= i < len(self):
            raise IndexError(i)
        return i + int(np.searchsorted(self.before, i, side="right"))


class CachedRows:
    """Training rows read from the cache on demand (a torch map-style dataset): ``rows`` are row indices,
    each truncated to ``max_seq_len`` as encode() would."""

    def __init__(self, cache: TokenCache, rows: Any, max_seq_len: int):
        self.cache, self.rows, self.max_seq_len = cache, rows, max_seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self.rows) <= i < len(self.rows):
            raise IndexError(i)
        return self.cache.row(int(self.rows[i]), self.max_seq_len)
