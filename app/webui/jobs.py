"""The commands the UI runs: each a real `python -m app <command> KEY=value ...` process, the same line the UI
shows for pasting, started in its own session. So a crash or restart of the UI never kills a training run,
Stop is the SIGTERM a terminal's `kill` sends (training checkpoints, then exits), and what a job prints goes
to a log under models/.webui/logs/ that the UI tails. A job that only serves the UI (the chat backend) is
started tied to it: it ends when the UI ends, however the UI ends (app/serve/parent.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app.serve.parent import PARENT_PID
from app.webui.forms import argv, command_line
from app.webui.paths import MODELS, project

log = logging.getLogger(__name__)

LOGS = Path(MODELS) / ".webui" / "logs"
CHECKPOINT_GRACE_S = 570  # a slow CPU step, then the checkpoint; inside compose's stop_grace_period (10m)


def job_env() -> dict[str, str]:
    """A command's environment: the UI's, less the UI's own make line (MAKEFLAGS: its names would be checked again
    as the job's) and PARENT_PID (a job is tied to this UI only where start says so), with unbuffered output so
    that the log tail is live."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", PARENT_PID)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def error_lines(log_text: str) -> list[str]:
    """The ERROR lines of a `python -m app` log without time, level and logger: the command line's one-line
    messages, as a terminal shows them."""
    out = []
    for line in log_text.splitlines():
        _, sep, msg = line.partition(" ERROR ")
        if sep:
            out.append(msg.split(": ", 1)[-1] if msg.startswith("app") else msg)
    return out


@dataclass
class Job:
    command: str
    line: str  # as shown to the user
    log: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        # tqdm redraws its bar with \r: keep each line's last drawing
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])

    def errors(self) -> list[str]:
        return error_lines(self.tail(200))

    def stop(self) -> bool:
        """SIGTERM, as `kill` or `docker compose stop` sends: training checkpoints, then exits."""
        if not self.running():
            return False
        os.kill(self.proc.pid, signal.SIGTERM)
        return True

    def status(self) -> str:
        code = self.proc.poll()
        if code is None:
            return f"running: pid {self.proc.pid}, {time.time() - self.started:,.0f} s"
        return "finished" if code == 0 else f"ended with exit code {code}"


class Jobs:
    """The jobs this UI started, by a key (the run dir, or a tab's name); one running job per key."""

    def __init__(self) -> None:
        self.by_key: dict[str, Job] = {}
        self.numbers = itertools.count(1)  # this UI's jobs, in order: each log's name is its own

    def get(self, key: str) -> Job | None:
        return self.by_key.get(key)

    def start(self, key: str, command: str, overrides: dict[str, str], tied: bool = False) -> Job:
        """``tied``: the job ends when this UI process ends, however it ends (a serve only; see PARENT_PID)."""
        running = self.get(key)
        if running is not None and running.running():
            raise RuntimeError(f"{key}: {running.command} is still running (pid {running.proc.pid})")
        logs = project() / LOGS
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}-{next(self.numbers)}.log"
        env = {**job_env(), **({PARENT_PID: str(os.getpid())} if tied else {})}
        with path.open("x", encoding="utf-8") as out:  # a new file: no earlier log is ever written over
            proc = subprocess.Popen(
                argv(command, overrides),
                cwd=project(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        job = Job(command, command_line(command, overrides), path, proc)
        self.by_key[key] = job
        log.info("started %s (pid %d), log %s", job.line, proc.pid, path)
        return job

    def wait(self, key: str, timeout: float | None = None) -> int | None:
        job = self.get(key)
        if job is None:
            return None
        try:
            return job.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_all(self) -> None:
        """At the UI's own exit: jobs that only serve the UI (the chat backend) end; on a host, training runs go
        on (their own sessions). In a container they could not: the engine kills whatever is left when the UI,
        its main process, ends. So there they get the SIGTERM first and a moment to save their checkpoint.
        A UI that is killed never gets here: then the chat backend ends by itself (tied, see start)."""
        in_container = Path("/.dockerenv").exists()
        ending = [job for job in self.by_key.values() if job.running() and (job.command == "serve" or in_container)]
        for job in ending:
            if job.command == "train":
                log.warning(
                    "stopping %s (pid %d): the container ends with the UI; it saves a checkpoint first, "
                    "and Resume continues it",
                    job.line,
                    job.proc.pid,
                )
            job.stop()
        deadline = time.monotonic() + CHECKPOINT_GRACE_S
        for job in ending:
            try:
                job.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not end in %d s", job.line, CHECKPOINT_GRACE_S)


def follow(job: Job, every_s: float = 1.0) -> Iterator[str]:
    """The job's log tail, again every ``every_s`` while it runs, and once more when it has ended."""
    while job.running():
        yield job.tail()
        time.sleep(every_s)
    yield job.tail()
