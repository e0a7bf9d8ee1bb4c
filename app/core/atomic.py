"""Atomic file and directory writes: a reader sees the previous file or dir, or the new one, never a mix.

A file is written to a temp file and renamed (atomic_write_text, write_json); a built dir appears by one
rename (built_whole); the final adapter's files move in one by one (staged_dir); a merge or export
replaces its whole dir (replace_dir), refusing a folder this tool did not write.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.errors import UserError

log = logging.getLogger("app")


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON, written whole (atomic_write_text)."""
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
def built_whole(out: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it becomes ``out`` by one rename (readable by all,
    as a container of another uid needs), on failure it is removed: an interrupted build never
    leaves a half-written dir that a later run would trust. Where ``out`` appeared meanwhile
    (another process built it), that copy is kept."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(tmp)
            return
        for item in [tmp, *tmp.rglob("*")]:  # safetensors and mkdtemp write 0600/0700
            publish(item)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


# ---- a whole directory replaced in one step (MERGED_DIR, ONNX_DIR) ---------------------------------------
# staged_dir above moves files one by one: right for OUTPUT_DIR, which also holds the run's checkpoints,
# metrics and perhaps merged/ (no whole-dir swap possible), but a kill -9 between two moves there would
# leave a mix. A merge or an export is one self-contained result, so it is written whole beside the
# target and swapped in by rename: a reader sees the previous dir or the new one, never a mix.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def replace_problem(target: str | Path, marker: str, setting: str) -> str | None:
    """Why ``target`` may not be replaced whole, or None: it is absent, empty, or a result this tool
    wrote (``marker`` in it). Anything else is someone's folder (or a trained run), never deleted."""
    target = Path(target).resolve() if Path(target).is_symlink() else Path(target)
    if not target.exists() or (target.is_dir() and (target / marker).is_file()):
        return None
    if target.is_dir() and not any(target.iterdir()):
        return None
    what = "is a file" if not target.is_dir() else f"holds files this tool did not write (no {marker} in it)"
    return (
        f"{setting}={target} {what}; it would be replaced whole. Choose another {setting} (an empty or "
        "new directory), or move those files away yourself"
    )


@contextmanager
def replace_dir(target: str | Path, marker: str, setting: str, kept_note: str = "") -> Iterator[Path]:
    """Yield an empty dir beside ``target`` (``.<name>.partial-<pid>``); on success it replaces ``target``
    whole: fsynced, then swapped in atomically (Linux renameat2 RENAME_EXCHANGE), else by renaming the
    old one aside (``.<name>.old-<pid>``) and the new one in. Leftovers of a killed earlier attempt are
    cleaned first, and an old copy left aside with nothing in its place is put back (and subdirectories
    a killed swap had not yet carried across, see below, are carried from the leftovers).

    Subdirectories of the old target that the new result lacks are moved across, with ``kept_note``
    in the log: ONNX_DIR defaults to merged/onnx, and a re-merge deleting an export the user made
    (minutes of work, perhaps served elsewhere) would surprise more than keeping it; predict warns
    that such an export is older than its model (app.models.artifacts.onnx_is_stale), and export-onnx
    always exports anew.

    Only a result of the same kind is replaced: ``marker`` (a file the result holds) must be in an
    existing non-empty ``target``, else a one-line UserError naming ``setting`` (replace_problem).
    The caller writes ``marker`` into the yielded dir."""
    target = Path(target)
    if target.is_symlink():  # e.g. merged/ -> a bigger disk: replace what it points at, keep the link
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_dir_debris(target)
    problem = replace_problem(target, marker, setting)
    if problem:
        raise UserError(problem)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"replace_dir: the new {target.name} has no {marker}")  # a caller's bug
        _settle_tree(tmp)
        _swap_in(tmp, target, kept_note)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old copy after an exchange, or a failed new one


def clean_dir_debris(target: str | Path) -> None:
    """Remove what killed replace_dir runs left beside ``target``; put an old copy back if it is missing."""
    target = Path(target)
    for kind in ("old", "partial"):  # old first: a target restored from it makes the partials plain debris
        for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another merge/export writing now
            if kind == "old" and not target.exists():
                os.rename(path, target)
                log.warning(
                    "restored %s from %s: an earlier write of it was killed while swapping the new copy in",
                    target,
                    path.name,
                )
                continue
            if target.is_dir():  # a swap killed before it carried the old dir's subdirectories across
                _carry_subdirs(path, target, "recovered from an interrupted earlier write of it")
            log.info("removing %s, left by an interrupted write of %s", path, target)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _swap_in(new: Path, target: Path, kept_note: str) -> None:
    if not target.exists():
        os.rename(new, target)
        fsync_dir(target.parent)
        return
    old = new  # after the exchange ``new`` names the previous content
    if not _exchange(new, target):
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        try:
            os.rename(new, target)  # a kill between the two renames: clean_dir_debris puts ``old`` back
        except BaseException:
            os.rename(old, target)
            raise
    fsync_dir(target.parent)
    _carry_subdirs(old, target, kept_note)
    if old != new:
        shutil.rmtree(old, ignore_errors=True)


def _carry_subdirs(old: Path, target: Path, note: str) -> None:
    """Move the subdirectories of ``old`` that ``target`` lacks into it (a merge writes none of its own,
    so these are what the user put there, e.g. merged/onnx); hidden ones are debris, left to go."""
    for sub in sorted(p for p in old.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (target / sub.name).exists():
            os.rename(sub, target / sub.name)
            log.warning("%s was kept from the replaced %s%s", target / sub.name, target, f": {note}" if note else "")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or filesystem lacks the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def _settle_tree(root: Path) -> None:
    """Normal permissions for everything under ``root`` (some writers, safetensors among them, make files
    private to the owner), and all of it on disk before the swap makes it visible: a power cut after the
    rename must not publish empty files."""
    for folder, _, files in os.walk(root):
        publish(folder)
        for name in files:
            path = os.path.join(folder, name)
            publish(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)
