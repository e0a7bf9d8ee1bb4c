"""Small shared helpers: logging, threads, seeding, atomic file writes, peak memory."""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("app")

# Where `train` records its output dir, so `predict` finds the last adapter by default.
LAST_RUN_FILE = Path("models") / ".last_run"


def setup_logging(level: str | int = "INFO") -> None:
    """One concise format for the app; quiet the chattier libraries.

    Under torchrun (NPROC/NNODES) each line names its rank, and ranks other than 0 log only
    warnings, errors and their own per-rank lines (app.dist): rank 0 speaks for the run.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not user news
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    if rank:
        logging.getLogger("app.dist").setLevel(level)
    for noisy in ("transformers", "peft", "bitsandbytes", "datasets", "httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def usable_cpus() -> int:
    """Cores this process may run on (affinity-aware; cgroup quotas are issue 3's monitor)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(n: int) -> int:
    import torch

    n = n or usable_cpus()
    torch.set_num_threads(n)
    return n


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a process started by a
    big parent (a benchmark driver, an IDE) would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(path: str | Path) -> None:
    """Give a temp file or dir normal permissions (mkstemp makes them private to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp dir; on success move each file into ``target`` (atomic per file).

    Used for the final adapter: a crash mid-save leaves the previous files intact.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging.", dir=target))
    try:
        yield tmp
        for item in tmp.iterdir():
            publish(item)
            dest = target / item.name
            if dest.is_dir() and item.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
