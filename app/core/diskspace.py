"""A full disk, told in one line: which path, how much was needed, how much is free, and what to do.

Writers fail on a full disk in several ways: an OSError with ENOSPC or EDQUOT from Python's own I/O, but
a RuntimeError from torch.save's zip writer (``[enforce fail at inline_container.cc] . unexpected pos``,
``basic_ios::clear: iostream error``) and other errors from native writers (safetensors). ``is_full``
tells them apart from other failures by asking the file system, not by trusting the message alone.
Standard library only.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# What native writers say when a write came up short; only believed when the disk is (nearly) full too.
_SHORT_WRITE = (
    "unexpected pos",
    "iostream error",
    "no space left",
    "file write failed",
    "write failed",
    "disk quota",
    "failed to write",
)
LOW_BYTES = 1 << 20  # under this much free, a failed write is taken for a full disk


def free_bytes(path: str | Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system that holds ``path`` (or would)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def is_full(exc: BaseException, path: str | Path, need: float | None = None) -> bool:
    """Whether ``exc``, raised while writing under ``path``, is a full disk (or an exhausted quota). A native
    writer's short-write message counts where less than LOW_BYTES, or than the ``need`` of what was being
    written, is free: ask before the half-written file is deleted, which gives its space back."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return False  # a permission or other error with its own errno
    text = str(exc).lower()
    free = free_bytes(path)
    return any(s in text for s in _SHORT_WRITE) and free is not None and free < max(LOW_BYTES, need or 0)


def human(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def full_line(
    setting: str, path: str | Path, doing: str, need: float | None, kept: str, again: str, fix: str = ""
) -> str:
    """The one line for a full disk while ``doing`` under ``path`` (named by ``setting``, if a setting names it)."""
    free = free_bytes(path)
    needs = f"needs about {human(need)}, " if need else ""
    fix = fix or f"free some space there or set {setting} on a bigger disk"
    return (
        f"{f'{setting}={path}' if setting else path}: no space left on the device while {doing} ({needs}"
        f"{human(free)} free on "
        f"{_mount_of(path)}); {kept}. {fix[0].upper()}{fix[1:]}, then {again}"
    )


def shortfall(setting: str, path: str | Path, need: float, what: str, fix: str = "") -> str | None:
    """Before writing: the one line when ``need`` bytes (``what``) do not fit in the free space, else None."""
    free = free_bytes(path)
    if free is None or free >= need:
        return None
    fix = fix or f"free some space there, or set {setting} on a bigger disk"
    return (
        f"{setting}={path}: {what} needs about {human(need)} and only {human(free)} are free on "
        f"{_mount_of(path)}; {fix}"
    )


def _mount_of(path: str | Path) -> str:
    probe = Path(os.path.realpath(Path(path).absolute()))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    while not os.path.ismount(probe) and probe != probe.parent:
        probe = probe.parent
    return str(probe)
