"""SIGTERM / SIGINT: training stops at a step boundary with a checkpoint instead of dying.

`docker compose stop`, Kubernetes, systemd and Ctrl-C all ask a process to stop with a signal.
Killed mid-step, a run would lose everything since its last SAVE_STEPS checkpoint. While the
Trainer runs, the first SIGTERM or SIGINT only sets a flag; at the end of the current optimizer
step the callback below makes the Trainer save a checkpoint to OUTPUT_DIR/checkpoints (from
which the same command resumes) and return, and FineTuner raises ``Interrupted``. A second
signal stops at once, keeping only the checkpoints already written.

Outside training, SIGTERM is turned into ``Interrupted`` (like Ctrl-C's KeyboardInterrupt), so
`finally` blocks and staged writes clean up, and so python still stops when it runs as PID 1 in
a container, where the kernel ignores a signal that has no handler.

Exit status: 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells report it.
Standard library only at import time: the CLI installs the handler before importing torch.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the command. A KeyboardInterrupt, so code that already cleans up
    after Ctrl-C does the same for SIGTERM."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_cli_handlers() -> None:
    """SIGTERM behaves like Ctrl-C for every command (see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


class StopRequest:
    """Set by the first stop signal while training; read by the callback at each step end."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise Interrupted(
                signum,
                f"second stop signal ({name}): stopped at once; the last checkpoint in "
                "OUTPUT_DIR/checkpoints, if any, resumes next run",
            )
        self.signum = signum
        log.warning(
            "%s received: finishing this optimizer step, then saving a checkpoint and stopping "
            "(send it again to stop at once)",
            name,
        )


@contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """While the block runs, the first SIGTERM/SIGINT only sets ``request.signum``."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # only the main thread may catch signals; elsewhere they keep their meaning
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, request.handle)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def stop_callback(request: StopRequest) -> TrainerCallback:
    """A TrainerCallback: after a stop signal, checkpoint at the end of this step and stop.

    Built lazily so importing this module does not import transformers.
    """
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
            if request.requested:
                control.should_save = True  # written before the loop exits: resumable
                control.should_training_stop = True
                control.should_evaluate = False  # stopping fast beats one more eval: SIGKILL may follow

    return StopOnSignal()
