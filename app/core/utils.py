"""Small shared helpers: logging, threads, peak memory, the last-run pointer (atomic writes: app.core.atomic)."""

from __future__ import annotations

import logging
import os
import resource
import sys
import warnings
from pathlib import Path

# Where `train` records its output dir, so `predict` finds the last adapter by default.
LAST_RUN_FILE = Path("models") / ".last_run"


def setup_logging(level: str | int = "INFO") -> None:
    """One concise format for the app; quiet the chattier libraries.

    Under torchrun (NPROC/NNODES) each line names its rank, and ranks other than 0 log only
    warnings, errors and their own per-rank lines (app.training.dist): rank 0 speaks for the run.
    """
    # Only known library chatter, by its message: a blanket FutureWarning filter would also hide the
    # deprecation that announces a change in the Trainer methods app.training.trainer overrides.
    # peft still calls transformers 5's renamed `is_gradient_checkpointing` once per training run.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # TRL 1.16 switches checkpointing off and on around every reference pass (STAGE=dpo/kto), by the old names
    warnings.filterwarnings(
        "ignore", message=r"`gradient_checkpointing_(en|dis)able` is deprecated", category=FutureWarning
    )
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tag = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if rank:
        logging.getLogger("app.training.dist").setLevel(level)
    for noisy in (
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "httpx",
        "urllib3",
        "filelock",
        "huggingface_hub",
    ):
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
