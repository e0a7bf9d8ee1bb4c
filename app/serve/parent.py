"""A server started for another process (the web UI's chat backend) ends when that process ends, however it
ends: its own shutdown path, `kill`, a service manager, SIGKILL or the OOM killer.

The parent names itself in PARENT_PID when it starts the server. The server then compares that with
``os.getppid()``: once at start-up (the parent may have died before the server got this far: then it never
loads a model), and on a watcher thread every WATCH_EVERY_S. The kernel sees to the rest: when the parent
dies, however it dies, its children are re-parented (to init or a subreaper), so getppid() changes. The
server then stops as `kill` would stop it (SIGTERM: uvicorn's graceful shutdown, or the CLI's Interrupted
while it loads), and ends at once if that has not ended it KILL_AFTER_S later.

Why not prctl(PR_SET_PDEATHSIG): the kernel sends that signal when the parent *thread* that forked the child
exits, not the process. The UI starts its backend from a Gradio worker thread, and anyio retires an idle
worker thread after 10 s, which would kill a healthy backend mid-conversation. getppid() names the parent
process, whichever of its threads forked; it is also not Linux-only. Training runs never get PARENT_PID:
on a host they outlive the UI on purpose (app/webui/jobs.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

PARENT_PID = "APP_PARENT_PID"  # set by a parent this process must not outlive
WATCH_EVERY_S = 0.5
KILL_AFTER_S = 20.0  # uvicorn's graceful shutdown takes up to 5 s (timeout_graceful_shutdown)


def end_with_parent() -> None:
    """When PARENT_PID is set: stop now if that process is no longer the parent, else watch it in a thread."""
    expected = os.environ.get(PARENT_PID, "")
    if not expected.isdigit():
        return
    if os.getppid() != int(expected):
        _stop(expected, "had already ended when this one started")
        return
    threading.Thread(target=_watch, args=(int(expected),), name="parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_EVERY_S)
    _stop(str(parent), "has ended")


def _stop(parent: str, how: str) -> None:
    log.warning("the process that started this one (%s=%s, e.g. the web UI) %s: stopping", PARENT_PID, parent, how)
    os.kill(os.getpid(), signal.SIGTERM)
    # A stop path that hangs (a stuck request, a handler that never runs) must not keep a model in memory.
    # A daemon: a clean exit does not wait for it.
    timer = threading.Timer(KILL_AFTER_S, os._exit, args=(128 + signal.SIGTERM,))
    timer.daemon = True
    timer.start()
