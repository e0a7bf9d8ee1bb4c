"""Real memory cgroups (v1 or v2) for tests and benchmarks: a limit the kernel enforces.

``docker run --memory 8g`` puts a container in such a cgroup; the memory tests and `make bench-scale`
make one the same way, as a child of this process's own memory cgroup, so that a run inside it sees
what a user's 8 GB PC or container gives it: the tool reads the limit, and the kernel's OOM killer
acts at it. Creating one needs root (or a delegated cgroup); ``create`` returns None where it cannot.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

MB = 2**20


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    v1: bool

    @property
    def procs(self) -> Path:
        """Write a pid here to move that process (and its later children) into the cgroup."""
        return self.path / "cgroup.procs"

    def join(self) -> None:
        """Move the calling process in: for ``subprocess.Popen(preexec_fn=cg.join)``, so the child is
        inside before it allocates anything."""
        self.procs.write_text("0")

    def peak_mb(self) -> float | None:
        """The highest charge the cgroup saw (RSS plus page cache it kept), or None where unknown."""
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        try:
            return int((self.path / name).read_text()) / MB
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer killed in this cgroup."""
        name = "memory.oom_control" if self.v1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def create(limit_mb: int, prefix: str = "cpu-trainer") -> MemoryCgroup | None:
    """A new child memory cgroup limited to ``limit_mb``, or None where this process may not make one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1_rel = next((ln.split(":", 2)[2] for ln in lines if ":memory:" in ln), None)
        v1 = v1_rel is not None
        base = Path("/sys/fs/cgroup/memory") if v1 else Path("/sys/fs/cgroup")
        rel = v1_rel if v1_rel is not None else next(ln.split(":", 2)[2] for ln in lines if ln.startswith("0::"))
        path = base / rel.lstrip("/") / f"{prefix}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
    except (OSError, StopIteration):
        return None
    cg = MemoryCgroup(path, v1)
    try:
        (path / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit_mb * MB))
        if v1:  # swap would let a run exceed the limit instead of being killed at it
            try:
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_mb * MB))
            except OSError:
                pass
        else:
            try:
                (path / "memory.swap.max").write_text("0")
            except OSError:
                pass
    except OSError:
        cg.remove()
        return None
    return cg
