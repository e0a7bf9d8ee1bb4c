"""Memory guard: never let the OOM killer end a run without a checkpoint.

A background sampler (app.plan.resources) watches process-tree RSS / cgroup usage. When usage
crosses WARN of the limit, the next optimizer step ends with a checkpoint. When it crosses
HIGH, training checkpoints and stops; FineTuner then either backs off (half the micro-batch,
twice the accumulation: same effective batch) and resumes from that checkpoint, or stops
with one line naming what to lower (MEMORY_GUARD=stop, or the micro-batch is already 1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from app.config import Config
from app.plan.tiers import Plan, halve_batch

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

WARN = 0.80  # checkpoint early: the step that crosses HIGH may already be too late to save
HIGH = 0.90


class MemoryGuard(TrainerCallback):
    def __init__(self, limit_mb: float, mode: str = "backoff"):
        self.limit_mb, self.mode = limit_mb, mode
        self.warned = threading.Event()
        self.tripped = threading.Event()
        self.trip_usage_mb = 0.0
        self.peak_mb = 0.0
        self.stopped_at: int | None = None
        self._saved_early = False

    def on_sample(self, usage_mb: float) -> None:
        """Called from the sampler thread; only sets flags (the Trainer acts at step end)."""
        self.peak_mb = max(self.peak_mb, usage_mb)
        if self.mode == "off" or not self.limit_mb:
            return
        if usage_mb >= HIGH * self.limit_mb and not self.tripped.is_set():
            self.trip_usage_mb = usage_mb
            self.tripped.set()
        elif usage_mb >= WARN * self.limit_mb:
            self.warned.set()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kw: Any,
    ) -> None:
        if logs is not None and "loss" in logs:  # to metrics.jsonl's trackers (REPORT_TO), after the loss
            logs.update(
                {
                    "memory_guard_peak_mb": round(self.peak_mb, 1),
                    "memory_guard_warned": int(self.warned.is_set()),
                    "memory_guard_tripped": int(self.tripped.is_set()),
                }
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.tripped.is_set():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            log.warning(
                "memory %.0f MB is over %.0f%% of the %.0f MB limit at step %d: checkpointing",
                self.trip_usage_mb,
                HIGH * 100,
                self.limit_mb,
                state.global_step,
            )
        elif self.warned.is_set() and not self._saved_early:
            self._saved_early = True
            control.should_save = True
            log.info("memory above %.0f%% of the limit: extra checkpoint at step %d", WARN * 100, state.global_step)

    def preflight(self, plan: Plan, predict: Callable[[Config], float]) -> Plan:
        """Back off before the first step when the estimator already predicts > HIGH of the limit.

        A sampler cannot stop a single allocation (e.g. the logits) that jumps past the limit,
        so a configuration predicted not to fit is shrunk up front, as the runtime guard would.
        ``predict(cfg)`` returns the predicted peak MB of a Config; returns the Plan to train with
        (a new one when it backed off).
        """
        if self.mode != "backoff" or not self.limit_mb:
            return plan
        why = f"memory guard: predicted peak over {HIGH:.0%} of the {self.limit_mb:,.0f} MB limit"
        while plan.cfg.train.batch_size > 1 and predict(plan.cfg) > HIGH * self.limit_mb:
            batch, accum = halve_batch(plan.cfg.train.batch_size, plan.cfg.train.grad_accum)
            plan = plan.set("BATCH_SIZE", batch, why).set("GRAD_ACCUM", accum, "keeps the effective batch")
            log.warning(
                "memory guard: predicted peak exceeds %.0f%% of the %.0f MB limit; BATCH_SIZE -> %d, "
                "GRAD_ACCUM -> %d (same effective batch)",
                HIGH * 100,
                self.limit_mb,
                batch,
                accum,
            )
        if predict(plan.cfg) > HIGH * self.limit_mb:
            log.warning(
                "memory guard: predicted peak %.0f MB is near the %.0f MB limit even at BATCH_SIZE=1; "
                "lower MAX_SEQ_LEN or use QUANT_LEVEL=4bit",
                predict(plan.cfg),
                self.limit_mb,
            )
        return plan

    def reset(self) -> None:
        self.tripped.clear()
        self.warned.clear()
        self.stopped_at = None
        self._saved_early = False
