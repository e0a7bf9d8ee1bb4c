"""Several processes, several machines: torch.distributed through torchrun and the HF Trainer.

``NPROC=N`` (and, across machines, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
turns ``python -m app train`` into torchrun: this process runs ``torch.distributed.run`` itself
(app.training.launcher: in-process, so that a failure ends in one line and not in torchrun's
error report) and it starts N workers ``python -m app train <your settings>``
on this machine. Each worker sees torchrun's RANK / WORLD_SIZE / LOCAL_RANK and trains as one
rank of a single DDP job driven by the HF Trainer: gloo on CPU, nccl on CUDA (one GPU per local
rank), DeepSpeed ZeRO with ``DS_CONFIG``. Nothing here splits data or averages gradients by hand.

* The global batch is BATCH_SIZE x GRAD_ACCUM x world size; each rank reads the same data and the
  Trainer's sampler gives it its share.
* Only rank 0 writes: outputs, metrics, TensorBoard, the progress bar, ``models/.last_run``.
  Checkpoints are written by rank 0 plus each rank's RNG state (needed for an exact resume).
* Decisions taken on one rank (a stop signal, the memory guard, early stopping) are agreed on by
  all ranks at every step end (``RankSync``), so no rank is left waiting in a collective.
* At the end every rank logs a digest of its trainable parameters and rank 0 checks they agree.

The launcher checks the cheap things (settings, OUTPUT_DIR, RESUME, data files) before starting
any worker, so bad input still ends in one line. Multi-node runs need OUTPUT_DIR on storage that
all machines share (checkpoints are written by rank 0, RNG states by every rank).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from app.config import Config
from app.core.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    from app.training.guard import MemoryGuard
    from app.training.signals import StopRequest

log = logging.getLogger(__name__)

LAUNCHER_PID = "APP_LAUNCHER_PID"  # set for our own workers: they stop when the launcher vanishes


# ---- where am I ---------------------------------------------------------------------------------


def in_worker() -> bool:
    """True in a process started by torchrun (ours, or the user's own torchrun/accelerate launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 (or a plain single process): the one that writes outputs."""
    return rank() == 0


def distributed() -> bool:
    return world_size() > 1


def owns_run_lock(cfg: Config) -> bool:
    """Whether this process holds OUTPUT_DIR's lock (app/training/runlock.py) for the whole job: a plain
    run, our launcher on node 0 (its workers run under it), or rank 0 of a torchrun the user
    started (no launcher of ours above it)."""
    if not in_worker():
        return cfg.distributed.node_rank == 0
    return LAUNCHER_PID not in os.environ and rank() == 0


def wants_launch(cfg: Config) -> bool:
    """NPROC/NNODES, or DS_CONFIG on one GPU: DeepSpeed initializes from torchrun's RANK/MASTER_ADDR variables,
    so even one process starts under the launcher (a plain process would fail in deepspeed.init_distributed)."""
    d = cfg.distributed
    return (d.nproc > 1 or d.nnodes > 1 or bool(d.ds_config)) and not in_worker()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def close() -> None:
    """End this worker's process group once its run is done: left to the interpreter's exit, the backend's
    threads are torn down still joinable, and the worker can abort there ("terminate called without an
    active exception") after a run that succeeded. Local to this rank: no collective runs."""
    if "torch.distributed" in sys.modules and _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if distributed() and _initialized():
        import torch.distributed as dist

        dist.barrier()


def zero_stage(cfg: Config) -> int | None:
    """DS_CONFIG's ZeRO stage (0-3), None without DS_CONFIG; a file that holds none is a UserError."""
    import json
    from pathlib import Path

    path = cfg.distributed.ds_config
    if not path:
        return None
    try:
        conf = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"DS_CONFIG={path}: no such file; use configs/ds_zero2.json or configs/ds_zero3.json") from None
    except (OSError, ValueError) as e:
        raise UserError(f"DS_CONFIG={path}: not a readable JSON file ({e}); start from configs/ds_zero2.json") from None
    stage = conf.get("zero_optimization", {}).get("stage") if isinstance(conf, dict) else None
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DS_CONFIG={path}: no zero_optimization.stage (0-3); start from configs/ds_zero2.json")
    return stage


def check_ds_config(cfg: Config, cuda: bool | None) -> None:
    """DS_CONFIG: a readable JSON object; on a machine without CUDA or deepspeed, one line saying so.

    DeepSpeed's own DS_ACCELERATOR=cpu runs it on the CPU (gloo, its shared-memory op compiled on first
    use): a dry run of a DS_CONFIG before renting GPUs, and how the CPU suite covers this path."""
    import importlib.util

    path = cfg.distributed.ds_config
    if not path:
        return
    zero_stage(cfg)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise UserError(
            f"DS_CONFIG={path}: DeepSpeed ZeRO needs CUDA GPUs; on CPU leave DS_CONFIG empty "
            "(NPROC=N runs plain DDP over gloo), or set DS_ACCELERATOR=cpu for a dry run on the CPU"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"DS_CONFIG={path}: deepspeed is not installed; `pip install deepspeed` (CUDA), or leave "
            "DS_CONFIG empty for plain DDP"
        )


# ---- in a worker ----------------------------------------------------------------------------------


def describe_rank() -> str:
    return (
        f"rank {rank()}/{world_size()} (node {os.environ.get('GROUP_RANK', '0')}, local rank {local_rank()}, "
        f"pid {os.getpid()})"
    )


def watch_launcher() -> None:
    """Our workers run in their own session (torchrun's choice); if the launcher dies without
    forwarding a signal (kill -9), stop like on SIGTERM: checkpoint at the step end and exit."""
    parent = os.environ.get(LAUNCHER_PID)
    if not parent or not in_worker():
        return

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(int(parent), 0)
            except ProcessLookupError:
                log.warning("%s: the launcher (pid %s) is gone; stopping with a checkpoint", describe_rank(), parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except (PermissionError, ValueError):
                return

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every trainable parameter's bytes, in name order: equal digests, equal weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(model: torch.nn.Module, steps: int, zero3: bool) -> None:
    """Each rank logs its digest; rank 0 compares them all (a silent divergence is a wrong model)."""
    if not distributed():
        return
    if zero3:
        log.info("%s: %d steps done (ZeRO-3 shards the parameters: no per-rank digest)", describe_rank(), steps)
        return
    import torch.distributed as dist

    digest = parameter_digest(model)
    log.info("%s: %d steps done, trainable parameters sha256 %s", describe_rank(), steps, digest)
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if is_main():
        if len(set(digests)) == 1:
            log.info("all %d ranks hold identical trainable parameters", world_size())
        else:
            log.error(
                "ranks disagree on the trained parameters: %s",
                ", ".join(f"rank {i} {d[:12]}" for i, d in enumerate(digests)),
            )


def rank_sync(guard: MemoryGuard, stop: StopRequest) -> TrainerCallback:
    """A TrainerCallback, last in the list: at each step end all ranks agree on whether to save,
    evaluate and stop, and share a stop signal or a memory-guard trip seen by any one of them."""
    from transformers import TrainerCallback

    class RankSync(TrainerCallback):
        def on_train_begin(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
        ) -> None:
            if not distributed():
                return
            import torch
            import torch.distributed as dist

            backend = dist.get_backend() if _initialized() else "none"
            log.info(
                "%s: training with %s, %d threads; global batch %d = BATCH_SIZE %d x GRAD_ACCUM %d x %d ranks",
                describe_rank(),
                backend,
                torch.get_num_threads(),
                args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size(),
                args.per_device_train_batch_size,
                args.gradient_accumulation_steps,
                world_size(),
            )

        def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
            if not (distributed() and _initialized()):
                return
            import torch
            import torch.distributed as dist

            flags = torch.tensor(
                [
                    float(stop.signum or 0),
                    float(guard.tripped.is_set()),
                    float(guard.warned.is_set()),
                    float(control.should_save),
                    float(control.should_training_stop),
                    float(control.should_evaluate),
                ],
                dtype=torch.float64,
            )
            if torch.cuda.is_available() and dist.get_backend() == "nccl":
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, tripped, warned, save, halt, evaluate = (int(x) for x in flags.tolist())
            if signum and not stop.requested:
                stop.signum = signum
            if tripped and not guard.tripped.is_set():
                guard.trip_usage_mb = guard.trip_usage_mb or guard.limit_mb
                guard.tripped.set()
            if warned:
                guard.warned.set()
            control.should_save = bool(save or signum or tripped)
            control.should_training_stop = bool(halt or signum or tripped)
            control.should_evaluate = bool(evaluate) and not (signum or tripped)

        def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
            # Early stopping is decided from the (already all-reduced) eval metrics on every rank;
            # agree anyway, so one rank's extra callback cannot leave the others waiting.
            if not (distributed() and _initialized()):
                return
            import torch
            import torch.distributed as dist

            flag = torch.tensor([float(control.should_training_stop)], dtype=torch.float64)
            if torch.cuda.is_available() and dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            control.should_training_stop = bool(flag.item())

    return RankSync()
