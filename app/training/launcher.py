"""The launcher: ``python -m app train`` with NPROC/NNODES becomes torchrun in this process
(torch.distributed.run, in-process so that a failure ends in one line and not in torchrun's error
report), starting the workers ``python -m app train <your settings>`` (app.training.dist)."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

from app.config import Config, show
from app.core.errors import UserError
from app.training.dist import LAUNCHER_PID, check_ds_config

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

log = logging.getLogger(__name__)

DEFAULT_MULTINODE_PORT = 29500  # torchrun's default


def launch(cfg: Config) -> None:
    """Run torchrun in this process: NPROC workers here, as node NODE_RANK of NNODES.

    The caller (``python -m app train``) has run the pre-flight (app/cli/preflight.py: settings, data,
    OUTPUT_DIR, RESUME) once, before any worker starts; what needs torch is checked here."""
    d = cfg.distributed
    check_ds_config(cfg, cuda=None)

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    cuda = torch.cuda.is_available()
    if cuda and d.nproc > torch.cuda.device_count():
        raise UserError(
            f"NPROC={d.nproc}: this machine has {torch.cuda.device_count()} GPU(s); on CUDA each "
            f"process needs its own, so use NPROC<={torch.cuda.device_count()}"
        )
    args = [
        f"--nproc-per-node={d.nproc}",
        f"--nnodes={d.nnodes}",
        f"--node-rank={d.node_rank}",
        "--max-restarts=0",
        f"--master-addr={d.master_addr}",
    ]
    port = d.master_port or (DEFAULT_MULTINODE_PORT if d.nnodes > 1 else 0)
    if port:  # static rendezvous on MASTER_ADDR:port; without one, torchrun picks a free local port
        args.append(f"--master-port={port}")
    # Every setting you gave goes to the workers as KEY=value (they read .env and the environment too).
    settings = [f"{var}={show(cfg.get(var))}" for var in sorted(cfg.explicit)]
    args += ["--module", "app", "train", *settings]
    # torchrun warns and sets OMP_NUM_THREADS=1 itself; each worker sets its own thread count (NUM_THREADS).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_PID] = str(os.getpid())
    if cfg.distributed.ds_config:
        interpreter_tools_on_path()
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its failure report is a traceback; ours is a line
    where = f"node {d.node_rank} of {d.nnodes}, " if d.nnodes > 1 else ""
    log.info(
        "torchrun: %d processes (%s%s, %s)%s",
        d.nproc,
        where,
        "nccl" if cuda else "gloo",
        f"rendezvous {d.master_addr}:{port}" if port else "a free local port",
        f", DeepSpeed {cfg.distributed.ds_config}" if cfg.distributed.ds_config else "",
    )
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        raise _worker_failure(cfg, e) from None
    except SignalException as e:  # torchrun forwarded the signal; the workers checkpointed and stopped
        from app.training.signals import Interrupted

        raise Interrupted(
            e.sigval,
            f"stopped by {signal.Signals(e.sigval).name}: the workers saved a "
            "checkpoint; run the same command to resume",
        ) from None


def interpreter_tools_on_path() -> None:
    """Put this interpreter's bin dir (.venv/bin) first on PATH, for the workers, as an activated venv would:
    DeepSpeed compiles its ops on first use with the `ninja` its pip package installs there, and `make` runs
    .venv/bin/python without activating the venv ("Unable to JIT load the ... op due to ninja not being
    installed" otherwise, where no system ninja is)."""
    import sys

    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")
        log.info("PATH: %s first, for DeepSpeed's ninja (as an activated venv has it)", bin_dir)


def _worker_failure(cfg: Config, err: ChildFailedError) -> BaseException:
    from app.training.signals import Interrupted

    codes = {r: f.exitcode for r, f in sorted(err.failures.items())}
    stopped = [c - 128 for c in codes.values() if c in (128 + signal.SIGTERM, 128 + signal.SIGINT)]
    if stopped and len(stopped) == len(codes):
        return Interrupted(
            stopped[0],
            f"stopped by {signal.Signals(stopped[0]).name}: checkpoint in "
            f"{cfg.train.output_dir}/checkpoints; run the same command to resume",
        )

    def why(code: int) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        return f"exited with status {code}" + (" (its error is above)" if code == 2 else "")

    first = next(iter(codes))
    return UserError(
        f"NPROC={cfg.distributed.nproc}: rank {first} {why(codes[first])}"
        + (f"; ranks {', '.join(map(str, codes))} failed" if len(codes) > 1 else "")
        + "; the last complete checkpoint, if any, resumes with the same command"
    )
