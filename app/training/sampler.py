"""A background sampler of the memory a run really uses: process-tree RSS, cgroup usage, CUDA
allocated/reserved, with peaks (summary.json's "memory") and a callback per reading (the memory
guard). The readings themselves are app.plan.resources'."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from app.plan.resources import MB, measure, torch_cuda

log = logging.getLogger(__name__)

PEAK_KEYS = ("peak_rss_mb", "peak_anon_mb", "peak_cgroup_mb", "peak_cuda_allocated_mb", "peak_cuda_reserved_mb")


class MemorySampler:
    """Daemon thread sampling every ``interval`` s: process-tree RSS, cgroup usage, CUDA allocated/
    reserved; keeps peaks. ``on_sample(usage_mb)`` gets each ``memory_usage_mb()`` figure (for a guard).
    Not ``ru_maxrss``: that misses children and page cache, and can't be reset between phases."""

    def __init__(
        self, interval: float = 0.25, root: str | Path = "/", on_sample: Callable[[float], None] | None = None
    ):
        self.interval, self.root, self.on_sample = interval, root, on_sample
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None
        self._torch: ModuleType | Literal[False] | None = None  # None: not looked for yet; False: no CUDA
        self.reset_peaks()

    def reset_peaks(self) -> None:
        with self._lock:
            self._peaks: dict[str, Any] = dict.fromkeys(PEAK_KEYS[1:]) | {"peak_rss_mb": 0.0, "samples": 0}

    def _cuda_module(self) -> Any:
        # Never import torch here: that would add ~1 s and ~200 MB to the very figures being measured.
        # A process using CUDA has imported torch already, so picking it up from sys.modules suffices.
        if self._torch is None and "torch" in sys.modules:
            self._torch = torch_cuda(import_it=False) or False
        return self._torch.cuda if self._torch else None

    def _cuda(self) -> tuple[float | None, float | None, float | None, float | None]:
        """(allocated, reserved, their peaks) in MB. The peaks are torch's own counters, as the process has them
        (loading included): a GPU's transient peaks last milliseconds, which sampling every ``interval`` misses.
        Never reset here: they are the process's, and other readers (tests/gpu) read them at its end."""
        cuda = self._cuda_module()
        if cuda is None:
            return None, None, None, None
        try:
            if not cuda.is_initialized():  # holds nothing on the GPU yet; querying would create a context
                return 0.0, 0.0, 0.0, 0.0
            gpus = range(cuda.device_count())
            reads = (cuda.memory_allocated, cuda.memory_reserved, cuda.max_memory_allocated, cuda.max_memory_reserved)
            alloc, reserved, max_alloc, max_reserved = (sum(map(read, gpus)) / MB for read in reads)
            return alloc, reserved, max_alloc, max_reserved
        except Exception:  # e.g. CUDA torn down at exit: RAM figures still count
            log.debug("CUDA memory unreadable: GPU figures left out", exc_info=True)
            return None, None, None, None

    def current(self) -> dict[str, Any]:
        """Measure now (and fold the reading into the peaks)."""
        rss, anon, cgroup = measure(self.root)
        cuda_alloc, cuda_res, max_alloc, max_res = self._cuda()
        now = {
            "rss_mb": rss,
            "anon_mb": anon,
            "cgroup_mb": cgroup,
            "cuda_allocated_mb": cuda_alloc,
            "cuda_reserved_mb": cuda_res,
            "usage_mb": max(anon, cgroup) if cgroup is not None else anon,
        }
        with self._lock:
            self._peaks["samples"] += 1
            for key in PEAK_KEYS:
                if (value := now[key[len("peak_") :]]) is not None:
                    self._peaks[key] = max(self._peaks[key] or 0.0, value)
            for key, value in (("peak_cuda_allocated_mb", max_alloc), ("peak_cuda_reserved_mb", max_res)):
                if value is not None:
                    self._peaks[key] = max(self._peaks[key] or 0.0, value)
        return now

    def peaks(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._peaks)

    def _run(self) -> None:
        while True:  # sample at once, then every interval until stop()
            try:
                usage = self.current()["usage_mb"]
                if self.on_sample is not None:
                    self.on_sample(usage)
            except Exception:  # one bad reading or callback must not end the monitoring
                log.warning("memory sample failed", exc_info=True)
            if self._stop.wait(self.interval):
                return

    def start(self) -> MemorySampler:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop the thread; returns the peaks."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():  # on_sample may stop us
            self._thread.join(timeout=max(1.0, 4 * self.interval))
            self._thread = None
        return self.peaks()

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
