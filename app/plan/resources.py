"""What this process may really use (RAM, CPUs, GPUs), and what it uses now (the training run's
background sampler, app.training.sampler, reads it from here).

Why not just ``psutil.virtual_memory()``: inside ``docker run --memory 6g`` it reports the host's
RAM, and a run sized for the host gets OOM-killed by the container's cgroup. So limits come from
the process's own cgroup (v1 or v2, walked up to the mount point since limits are hierarchical),
found via ``<root>/proc/self/{cgroup,mountinfo}``; ``root`` lets tests use a fake tree. Any read
failure means "unknown" and falls back to host figures: a monitor must never crash a run.
MB means 2**20 bytes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import posixpath
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app.core.utils import usable_cpus

log = logging.getLogger(__name__)

MB = 2**20
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo escapes space, tab, newline and backslash as \ooo


# glibc serves allocations below a sliding threshold (it grows to 32 MB once such a block is
# freed) from heaps it rarely gives back; activation-sized tensors then pile up as freed but
# resident memory: +0.8 GB on a 4-bit 0.9B model at batch 1. A fixed threshold sends every
# tensor above 256 KB to mmap, returned to the OS on free. That costs a page fault per fresh page
# of every such tensor: 1.9x the step time of a 0.9M-parameter model (0.42 vs 0.22 s), so
# RELEASE_MEMORY=auto applies it only when memory is tight (TIGHT_MEMORY of the budget predicted in use).
MMAP_THRESHOLD = 256 * 1024
TIGHT_MEMORY = 0.5
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def tune_allocator() -> bool:
    """Return freed tensor memory to the OS at once (glibc only; no-op elsewhere or if the user
    set MALLOC_MMAP_THRESHOLD_ themselves). True when applied."""
    import ctypes
    import os

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False


def release_memory(mode: str, cuda: bool, peak_mb: float, budget_mb: float) -> bool:
    """RELEASE_MEMORY: tune_allocator() when ``on``, or when ``auto`` and the predicted peak is over
    TIGHT_MEMORY of the budget (or on CUDA, where it only touches host memory). True when applied."""
    if not (mode == "on" or (mode == "auto" and (cuda or peak_mb > TIGHT_MEMORY * budget_mb))):
        log.info(
            "allocator: glibc default (RELEASE_MEMORY=%s; predicted peak %.0f MB of %.0f MB)", mode, peak_mb, budget_mb
        )
        return False
    applied = tune_allocator()
    log.info(
        "allocator: freed tensor memory goes back to the OS at once%s (predicted peak %.0f MB of %.0f MB)",
        "" if applied else " (not applied: no glibc, or MALLOC_MMAP_THRESHOLD_ set)",
        peak_mb,
        budget_mb,
    )
    return applied


@dataclass
class GPUInfo:
    index: int
    name: str
    total_mb: float
    free_mb: float
    bf16: bool


@dataclass
class Resources:
    ram_total_mb: float  # what this process may use: min(host RAM, cgroup limit, MEMORY_LIMIT_MB)
    ram_available_mb: float  # min(host available, limit - current usage net of reclaimable cache)
    host_ram_total_mb: float
    limit_source: str  # "host", "cgroup v1", "cgroup v2" or "MEMORY_LIMIT_MB"
    cpus: int  # min(affinity, ceil(cgroup quota))
    cpu_source: str  # "affinity" or "cgroup quota"
    gpus: list[GPUInfo] = field(default_factory=list)
    no_gpu: str = ""  # why gpus is empty, for make info's one GPU line


def _read(path: Path) -> str | None:  # None on any failure, like every reader here
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:  # missing, "max" or garbage
        return None


def _relative(path: str, mount_root: str) -> str | None:  # "" if equal, None if outside mount_root
    if ".." in path.split("/"):  # the kernel's way of saying "outside your cgroup namespace"
        return None
    rel = posixpath.relpath(posixpath.normpath(path or "/"), posixpath.normpath(mount_root or "/"))
    return None if rel == ".." or rel.startswith("../") else ("" if rel == "." else rel)


def _cgroup_dirs(root: Path, controller: str) -> tuple[list[Path], int] | None:
    """(the process's cgroup dir and its parents up to the mount point, version) for ``controller``.
    A v1 mount with the controller wins: on hybrid hosts the v2 tree exists but limits live in v1."""
    proc_paths: dict[int, str] = {}  # version -> cgroup path of this process
    for parts in (line.split(":", 2) for line in (_read(root / "proc/self/cgroup") or "").splitlines()):
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            proc_paths.setdefault(2, parts[2])
        elif len(parts) == 3 and controller in parts[1].split(","):
            proc_paths[1] = parts[2]
    mounts: dict[int, list[tuple[str, ...]]] = {1: [], 2: []}  # version -> [(mount root, mount point)]
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")  # fstype, source, super options follow the " - "
        fields, tail = left.split(), right.split() + ["", "", ""]
        version = 2 if tail[0] == "cgroup2" else 1 if tail[0] == "cgroup" and controller in tail[2].split(",") else 0
        if version and len(fields) >= 5:
            mounts[version].append(tuple(_OCTAL.sub(lambda m: chr(int(m[1], 8)), f) for f in fields[3:5]))
    for version in (v for v in (1, 2) if mounts[v]):
        path = proc_paths.get(version, "/")
        mount_root, mount_point = next(
            (m for m in mounts[version] if _relative(path, m[0]) is not None), mounts[version][0]
        )
        base = root / mount_point.lstrip("/")
        own = base / (_relative(path, mount_root) or "")
        # A container without a cgroup namespace shows a host path that isn't mounted inside it:
        # the mount point itself is then the container's cgroup.
        dirs = [own if own.is_dir() else base]
        while dirs[-1] != base and base in dirs[-1].parents:
            dirs.append(dirs[-1].parent)
        return dirs, version
    return None


def cgroup_memory(root: str | Path = "/") -> tuple[int | None, int | None, int | None]:
    """(limit bytes or None if unlimited, usage bytes net of inactive file cache, cgroup version).
    Usage is the limiting cgroup's (the kernel compares that with the limit, siblings included),
    else our own. Inactive file pages are reclaimed before an OOM kill, so they don't count."""
    dirs, version = _cgroup_dirs(Path(root), "memory") or ([], 0)
    if not dirs:
        return None, None, None
    limit_file, usage_file = (
        ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    )
    limit, limit_dir = None, dirs[0]
    for d in dirs:
        # v2 "max" reads as None; v1's "no limit" is 2**63 page-rounded (9223372036854771712)
        value = _int(_read(d / limit_file))
        if value is not None and 0 < value < 2**60 and (limit is None or value < limit):
            limit, limit_dir = value, d
    # Clean file pages (page cache, mmap'd checkpoints) are reclaimed before any OOM kill.
    keys = (
        ("inactive_file", "active_file")
        if version == 2
        else ("total_inactive_file", "total_active_file")
        if "total_inactive_file" in (_read((limit_dir or dirs[0]) / "memory.stat") or "")
        else ("inactive_file", "active_file")
    )
    for d in dict.fromkeys([limit_dir, dirs[0]]):  # the limiting cgroup's usage, else our own
        usage = _int(_read(d / usage_file))
        if usage is not None:
            lines = (_read(d / "memory.stat") or "").splitlines()
            stat = dict(ln.split(None, 1) for ln in lines if len(ln.split()) == 2)
            reclaimable = sum(int(stat[k]) for k in keys if stat.get(k, "").strip().isdigit())
            return limit, max(0, usage - reclaimable), version
    return limit, None, version


def cgroup_cpu_limit(root: str | Path = "/") -> float | None:
    """Smallest CPU quota (in CPUs) from the process's cgroup up to the mount point; None if unlimited."""
    dirs, version = _cgroup_dirs(Path(root), "cpu") or ([], 0)
    best: float | None = None
    for d in dirs:
        if version == 2:  # "200000 100000", or "max 100000" = unlimited ("max" reads as None)
            quota, period = (_int(x) for x in ((_read(d / "cpu.max") or "").split() + ["", ""])[:2])
        else:  # quota -1 = unlimited
            quota, period = _int(_read(d / "cpu.cfs_quota_us")), _int(_read(d / "cpu.cfs_period_us"))
        if quota and period and quota > 0 and period > 0:
            best = quota / period if best is None else min(best, quota / period)
    return best


def process_tree_rss_mb(pid: int | None = None, anon: bool = False) -> float:
    """RSS of the process and all its descendants (e.g. DataLoader workers), in MB.
    Shared pages count once per process: a forked tree is overstated a little, the safe side.
    ``anon``: leave out file-backed pages (mmap'd checkpoints), which the kernel can reclaim."""
    total = 0
    try:
        parent = psutil.Process(pid)
        for p in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that exited between listing and reading
                info = p.memory_info()
                total += info.rss - (getattr(info, "shared", 0) if anon else 0)
    except psutil.Error:  # the process itself is gone
        return 0.0
    return total / MB


def measure(root: str | Path) -> tuple[float, float, float | None]:
    """(tree RSS MB, tree anonymous MB, cgroup usage net of file pages MB or None without a limit)."""
    limit, usage, _ = cgroup_memory(root)
    return (
        process_tree_rss_mb(),
        process_tree_rss_mb(anon=True),
        usage / MB if limit is not None and usage is not None else None,
    )


def memory_usage_mb(root: str | Path = "/") -> float:
    """The figure a guard compares with ``Resources.ram_total_mb``: what cannot be reclaimed.
    In a limited cgroup the kernel kills on the cgroup's usage (other processes too), so the
    larger of that and the tree's anonymous memory; file-backed pages are reclaimed first."""
    _, anon, cgroup = measure(root)
    return max(anon, cgroup) if cgroup is not None else anon


def torch_cuda(import_it: bool) -> Any | None:
    """torch if it sees CUDA, else None; imports it only if asked and installed."""
    if "torch" not in sys.modules and not (import_it and importlib.util.find_spec("torch")):
        return None
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install must not break the CPU path
        log.debug("torch.cuda is unusable: CUDA taken as absent", exc_info=True)
        return None


def _gpus() -> list[GPUInfo]:
    torch = torch_cuda(import_it=True)
    gpus: list[GPUInfo] = []
    if torch is None:
        return gpus
    for i in range(torch.cuda.device_count()):
        try:
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(GPUInfo(i, props.name, total / MB, free / MB, bf16=props.major >= 8))  # Ampere+
        except Exception:  # one odd device (busy, exclusive mode) must not hide the others
            log.warning("cannot query CUDA device %d", i, exc_info=True)
    return gpus


def no_gpu_reason() -> str:
    """Why torch sees no GPU, in one line: no torch, a CPU-only build, or torch's own first sentence
    when its CUDA build finds no driver or device (as a CUDA image run without the GPU does)."""
    if "torch" not in sys.modules and not importlib.util.find_spec("torch"):
        return "torch is not installed"
    import torch

    build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else "") or (
        f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else ""
    )
    if not build:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()  # raises torch's reason; a no-op when CUDA is up
        answer = "it lists no device"
    except (RuntimeError, AssertionError, OSError) as e:  # e.g. "Found no NVIDIA driver on your system. Please ..."
        answer = str(e).strip().split(". ")[0].rstrip(".")
    # A container sees the GPU only when it is given one, which is the usual miss with the CUDA image.
    docker = (
        " (a container gets the GPU from --gpus or docker-compose.cuda.yml)" if Path("/.dockerenv").exists() else ""
    )
    return f"torch {torch.__version__} is built for {build}, but: {answer}{docker}"


def detect_resources(memory_limit_mb: float = 0, root: str | Path = "/") -> Resources:
    """RAM, CPUs and GPUs this process may use; ``memory_limit_mb`` > 0 caps RAM further."""
    host_total = total = (vm := psutil.virtual_memory()).total / MB
    available, source = vm.available / MB, "host"
    limit, usage, version = cgroup_memory(root)
    if limit is not None:
        available = min(available, max(0.0, (limit - (usage or 0)) / MB))
        if limit / MB < total:
            total, source = limit / MB, f"cgroup v{version}"
    if memory_limit_mb and memory_limit_mb > 0:
        available = min(available, max(0.0, memory_limit_mb - memory_usage_mb(root)))
        if memory_limit_mb < total:
            total, source = float(memory_limit_mb), "MEMORY_LIMIT_MB"
    cpus, cpu_source, quota = usable_cpus(), "affinity", cgroup_cpu_limit(root)
    if quota is not None and math.ceil(quota - 1e-9) < cpus:  # 1.5 CPUs of quota keep 2 threads busy
        cpus, cpu_source = max(1, math.ceil(quota - 1e-9)), "cgroup quota"
    gpus = _gpus()
    no_gpu = "" if gpus else no_gpu_reason()
    res = Resources(total, min(available, total), host_total, source, cpus, cpu_source, gpus, no_gpu)
    log.debug("%s", res)
    return res
