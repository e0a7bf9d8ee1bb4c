"""One writer per run directory: an OS lock on ``<dir>/.trainer-run.lock``.

Two `make train` into the same OUTPUT_DIR (two terminals, or `docker compose up` beside a host
run) used to "resume" each other's checkpoints, cut each other's metrics.jsonl and publish into
the same files. Now the command that writes a run (train, merge, export-onnx, remove-run) holds
an exclusive ``flock`` on the run's lock file while it works, and a second one is refused with
one line naming the holder.

Why flock and not a pid file: the kernel drops the lock when its process dies, however it
dies (kill -9, OOM killer, power off of a container), so a lock is never stale and nothing has
to guess whether a recorded pid is still alive. The file's contents (pid, host, command, start
time) are only there for the message. The holder deletes the file when it is done, so a finished
run's dir holds no lock file; deleting a lock file is safe only because whoever takes the lock
then checks that the file it locked is still the one at the path (else it retries). flock works
across the bind mount between the container and the host (one kernel); on a network file system
without locks the command warns and runs unlocked.

Standard library only: the CLI takes the lock before torch is imported.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.errors import UserError
from app.core.ownership import RUN_LOCK

log = logging.getLogger(__name__)

LOCK_FILE = RUN_LOCK  # a name no user file has: the holder deletes it when done
_held: dict[Path, int] = {}  # dir -> fd: this process's locks (re-entrant: the CLI's, then FineTuner.train's)


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock (pid, host, command, started), or None when nobody does.
    Probes without keeping the lock; a lock held by this process counts as free."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file() or _key(run_dir) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    except OSError:  # no locks on this file system: nobody can be told apart
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def busy_line(setting: str, run_dir: str | Path, who: dict[str, Any], doing: str, alternative: bool = False) -> str:
    """The one line for a refused command: who holds the run, since when, and the ways out
    (``alternative``: another ``setting`` is one)."""
    pid, host, cmd = who.get("pid"), who.get("host"), who.get("command", "another command")
    where = f"pid {pid}" if pid else "another process"
    if host and host != socket.gethostname():
        where += f" on {host} (another machine or container)"
    since = ""
    if isinstance(who.get("started"), (int, float)):
        mins = max(0, int(time.time() - who["started"]) // 60)
        ago = "under a minute ago" if mins < 1 else f"{mins} min ago"
        since = f", started {time.strftime('%H:%M:%S', time.localtime(who['started']))}, {ago}"
    stop = f"stop it (kill -TERM {pid}: training checkpoints first)" if pid else "stop it"
    other = f", or choose another {setting}" if alternative else ""
    return (
        f"{setting}={run_dir} is in use: `{cmd}` ({where}{since}) is writing there; {doing} would collide "
        f"with it. Wait for it to finish or {stop}{other}"
    )


@contextmanager
def hold(
    run_dir: str | Path,
    command: str,
    setting: str = "OUTPUT_DIR",
    doing: str = "this run",
    optional: bool = False,
    alternative: bool = False,
) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (creating the dir). Raises a one-line UserError when
    another process holds it. ``optional``: a dir this process may not write to is used unlocked
    (nobody can be writing a run there either)."""
    key = _key(run_dir)
    if key in _held:  # the CLI took it; FineTuner.train asks again
        yield
        return
    made = not Path(run_dir).exists()  # a run refused before writing anything leaves no empty dir behind
    fd = _acquire(run_dir, command, setting, doing, optional, alternative)
    if fd is None:
        yield
        return
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        try:
            (Path(run_dir) / LOCK_FILE).unlink()  # while still holding it (see the docstring)
            if made:
                Path(run_dir).rmdir()  # only if still empty: the run wrote nothing
        except OSError:
            pass  # remove-run took the whole dir, or the run wrote there
        os.close(fd)  # releases the lock


def _acquire(
    run_dir: str | Path, command: str, setting: str, doing: str, optional: bool, alternative: bool
) -> int | None:
    """The locked fd, or None when the dir is used unlocked (see hold)."""
    path = Path(run_dir) / LOCK_FILE
    while True:
        fd = _locked(path, run_dir, setting, doing, optional, alternative)
        if fd is None:
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder we waited on removed it meanwhile: lock the file that is there now
    _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()})
    return fd


def _locked(path: Path, run_dir: str | Path, setting: str, doing: str, optional: bool, alternative: bool) -> int | None:
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if optional and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            log.debug("%s: not writable, used without a lock", run_dir)
            return None
        raise UserError(
            f"{setting}={run_dir}: cannot create its lock file ({os.strerror(e.errno or 0).lower()}); "
            f"choose a writable {setting}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _read(fd)
        os.close(fd)
        raise UserError(busy_line(setting, run_dir, who, doing, alternative)) from None
    except OSError as e:  # ENOLCK/EOPNOTSUPP: a file system without locks (some NFS mounts)
        log.warning(
            "%s=%s: cannot lock it (%s), so nothing stops a second run from writing there too; do not start two",
            setting,
            run_dir,
            os.strerror(e.errno or 0).lower(),
        )
        os.close(fd)
        return None
    return fd


def _key(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve()


def _write(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # the holder is between taking the lock and writing its details
