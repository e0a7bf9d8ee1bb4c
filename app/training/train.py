"""Training: one path for every method, driven by the HF Trainer.

Why the HF Trainer and not a hand-written loop: it already does gradient accumulation with
correct token-weighted loss, warmup + schedules, clipping, checkpoint/resume with optimizer
and RNG state, and torch.distributed / DeepSpeed launch, all of which later issues rely on.
What it lacks for this tool lives in app/training/callbacks.py. Notebook use:
``FineTuner(Config.from_dict({"MODEL_NAME": "tiny", "MAX_SAMPLES": 50})).run()``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Config
from app.core import ownership
from app.core.errors import UserError
from app.core.utils import peak_rss_mb, set_threads
from app.models.loading import ALL_LINEAR, load_tokenizer, resolve
from app.plan.estimator import ModelShape
from app.plan.precision import resolve_precision
from app.plan.resources import Resources
from app.plan.stages import min_batch
from app.plan.tiers import Plan, apply_tier, halve_batch
from app.plan.train_timing import StepTime, expected_time
from app.training import disk, dist, runlock
from app.training.checkpoints import CHECKPOINTS, check_output_dir, clear_staging, finished_run, latest_checkpoint
from app.training.disk import DiskNeeds, write_error
from app.training.outputs import METRICS, TrainResult, mean_logged_loss, open_output_dir, publish, truncate_metrics
from app.training.prepare import PreparedData, prepare_data
from app.training.resume import checkpoint_step, data_fingerprints, decide
from app.training.trainable import trainable_model

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import TrainOutput

    from app.training.guard import MemoryGuard
    from app.training.sampler import MemorySampler
    from app.training.signals import StopRequest

log = logging.getLogger(__name__)


class FineTuner:
    """setup() -> prepare_data() -> train(). Nothing is written to OUTPUT_DIR before train() (prepare_data()
    builds the token cache of a MAX_SAMPLES=all run under CACHE_DIR, unless told not to).

    setup: resources, the resume check, the tier's plan, tokenizer and the model's shape (no weights yet);
    prepare_data: read, sample, tokenise, then fit sequence length / batch to memory (app/training/prepare.py);
    load_model: weights (quantized as planned) + LoRA; train() calls it if you did not.
    ``cfg`` is the user's Config until setup() plans it, then the plan's; neither is ever changed in place.
    """

    def __init__(self, cfg: Config):
        self.given = cfg  # the user's settings, as given
        self.plan: Plan | None = None  # each planning step (tier, memory fit, guard, back-off) makes a new one
        self.model_path = ""
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.model: PreTrainedModel | PeftModel | None = None
        self.resources: Resources | None = None
        self.shape: ModelShape | None = None
        self.data = PreparedData(Plan())  # rows, validation examples, report, records: prepare_data()
        self.guard: MemoryGuard | None = None
        self.stop: StopRequest | None = None  # while train() runs
        self.resume_from: Path | None = None  # RESUME's checkpoint, checked against these settings (setup)
        self._discard = False  # OVERWRITE=1 over an unfinished run of other settings: its checkpoints go
        self._data_fp: dict[str, Any] = {}  # the data's fingerprints at the start, recorded in each checkpoint
        self._ds_args: TrainingArguments | None = None  # made before loading, for DeepSpeed ZeRO-3
        self.timing: StepTime | None = None  # the expected time per step and run, logged when train() starts
        self.disk: DiskNeeds | None = None  # what the run writes to OUTPUT_DIR, checked when train() starts

    @property
    def cfg(self) -> Config:
        return self.plan.cfg if self.plan is not None else self.given

    # what prepare_data() made, under the names the Trainer wiring and notebooks use
    train_rows = property(lambda self: self.data.train_rows)
    val_rows = property(lambda self: self.data.val_rows)
    val_examples = property(lambda self: self.data.val_examples)
    records = property(lambda self: self.data.records)
    data_report = property(lambda self: self.data.report)

    # ---- steps -----------------------------------------------------------------------
    def setup(self) -> FineTuner:
        from app.plan.estimator import model_shape
        from app.plan.resources import detect_resources
        from app.training.preference_trainer import start_adapter

        self.given = start_adapter(self.given)  # STAGE=dpo/kto continuing an adapter takes its base and shape
        res = self.resources = detect_resources(self.given.resources.memory_limit_mb)
        procs = dist.local_world_size()
        if procs > 1 and not res.gpus:  # ranks on one machine share its RAM (each has its own GPU)
            res = self.resources = dataclasses.replace(res, ram_available_mb=res.ram_available_mb / procs)
        cfg, held = self._resume_check()
        self.plan = apply_tier(cfg, res, held)
        if self.plan.device == "cuda" and dist.distributed():
            import torch

            torch.cuda.set_device(dist.local_rank())  # one GPU per local rank; load_model places weights there
        dist.check_ds_config(self.cfg, cuda=self.plan.device == "cuda")
        threads = set_threads(self.cfg.model.num_threads or max(1, res.cpus // procs))
        self.model_path = resolve(self.cfg)
        log.info(
            "RAM %.1f GB (%s), %.1f GB available, %d CPUs%s; tier %s; loading %s (%d threads)",
            res.ram_total_mb / 1024,
            res.limit_source,
            res.ram_available_mb / 1024,
            res.cpus,
            "".join(f", GPU {g.name} {g.total_mb / 1024:.0f} GB" for g in res.gpus),
            self.plan.tier,
            self.model_path,
            threads,
        )
        self.tokenizer = load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
        targets = [t for t in self.cfg.lora.lora_targets if t != ALL_LINEAR] or None  # all-linear: as detected
        self.shape = model_shape(self.model_path, targets, self.cfg.model.trust_remote_code)
        return self

    def _resume_check(self) -> tuple[Config, dict[str, str]]:
        """The checkpoint this run continues (RESUME), checked against these settings (app/training/resume.py);
        returns the Config the tier plans on (a resumed run keeps its tier's settings) and those held, with why."""
        cfg = self.given
        rc, self._discard = decide(cfg)
        self.resume_from = None
        if rc is None:
            return cfg, {}
        if self._discard:
            log.warning(
                "OVERWRITE=1: the unfinished run in %s (%s, step %d) cannot continue as asked (%s); "
                "training anew, and its checkpoints are removed when training starts",
                cfg.train.output_dir,
                rc.checkpoint.name,
                rc.step,
                "; ".join(rc.differences),
            )
            return cfg, {}
        rc.log()
        self.resume_from = rc.checkpoint
        held = {var: f"kept from {rc.checkpoint.name} (resumed)" for var in rc.kept}
        return cfg.replace(rc.kept, explicit=rc.kept), held  # planned once, when the run started: not again

    def prepare_data(self, build_cache: bool = True) -> FineTuner:
        """Read, sample, split and tokenise; fit MAX_SEQ_LEN/batch to memory. Writes nothing."""
        if self.plan is None or self.tokenizer is None:
            raise RuntimeError("call setup() before prepare_data()")
        self.data = prepare_data(self.plan, self.resources, self.tokenizer, self.shape, build_cache)
        self.plan = self.data.plan
        return self

    def load_model(self) -> FineTuner:
        """Weights (quantized as planned) + the method's trainable part (app/training/trainable.py)."""
        if self.cfg.distributed.ds_config:  # ZeRO-3 partitions the weights as they load: its config comes first
            self._ds_args = self._training_args(Path(self.cfg.train.output_dir) / CHECKPOINTS)
        self.model = trainable_model(self.cfg, self.model_path, self.plan.device == "cuda")
        return self

    def train(self, callbacks: list[TrainerCallback] | None = None) -> TrainResult:
        """Run the Trainer; write adapter, tokenizer, config, metrics and plot to OUTPUT_DIR.

        ``callbacks``: extra transformers TrainerCallbacks (a notebook's own logging, say).
        RESUME=auto continues from the newest complete checkpoint in OUTPUT_DIR/checkpoints left by
        a killed run; RESUME=<path> from that one (setup() checked it matches these settings).
        OUTPUT_DIR is locked meanwhile (app/training/runlock.py): a second run into it is refused.
        """
        if not self.train_rows:
            raise RuntimeError("call setup() and prepare_data() before train()")
        out = Path(self.cfg.train.output_dir)
        lock = runlock.hold(out, "train", doing="training there too", alternative=True)
        with lock if dist.owns_run_lock(self.cfg) else nullcontext():
            return self._train(out, callbacks)

    def _train(self, out: Path, callbacks: list[TrainerCallback] | None) -> TrainResult:
        """The run, step by step. Only rank 0 writes outputs (a plain single process is rank 0)."""
        check_output_dir(self.cfg)  # writable, and no finished run replaced unasked: before loading weights
        self._data_fp = data_fingerprints(self.cfg)
        self.timing = expected_time(
            self.cfg, self.shape, self.model_path, self.train_rows, self.plan.device == "cuda", dist.world_size()
        )
        log.info("%s", self.timing.line())
        self.disk = disk.planned(self.cfg, self.shape, self.model_path, out, dist.is_main())  # before the weights
        if self.model is None:
            self.load_model()
        previous = finished_run(out) if out.is_dir() else None  # named in a failed write's line
        if dist.is_main():
            open_output_dir(out, self.cfg, self._discard, self.resume_from, previous)
        before = ownership.entries_now(out)
        try:
            self.guard = self._memory_guard()
            trainer, out_state, seconds, peaks = self._fit(out, previous, callbacks)
            result, weights = self._result(out, trainer, out_state, seconds, peaks)
            if dist.is_main():
                self._publish(out, result, peaks, weights, previous)
        finally:  # what a tracker wrote under a name not known in advance: the run's too
            if dist.is_main():
                ownership.register_new(out, before, ownership.RUN_NAMES)
        dist.barrier()  # the other ranks return once rank 0's outputs are complete
        return result

    def _memory_guard(self) -> MemoryGuard:
        """The guard for this machine's limit; its pre-flight may already halve the batch (a new plan)."""
        from app.plan.peak import predict_peak
        from app.training.guard import MemoryGuard

        res, cuda = self.resources, self.plan.device == "cuda"
        guard = MemoryGuard(res.gpus[0].total_mb if cuda else res.ram_total_mb, self.cfg.resources.memory_guard)
        self.plan = guard.preflight(self.plan, lambda cfg: predict_peak(cfg, self.shape, cuda).total_mb)
        return guard

    def _fit(
        self, out: Path, previous: Path | None, callbacks: list[TrainerCallback] | None
    ) -> tuple[Trainer, TrainOutput, float, dict]:
        """The Trainer's loop, watched by the memory sampler; SIGTERM/SIGINT checkpoint at the end of the
        step, then stop (app/training/signals.py)."""
        from app.training.sampler import MemorySampler
        from app.training.signals import Interrupted, stop_callback, stop_on_signal

        ckpt_dir, t0 = out / CHECKPOINTS, time.perf_counter()
        try:
            with MemorySampler(on_sample=self.guard.on_sample) as sampler, stop_on_signal() as self.stop:
                trainer, out_state = self._train_with_backoff(
                    out, ckpt_dir, sampler, [*(callbacks or []), stop_callback(self.stop)]
                )
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            # judged while the half-written checkpoint still fills the disk; e itself when it is no full disk
            error = write_error(e, out, "writing a checkpoint or the training logs", previous, self.disk.checkpoint)
            if dist.is_main():
                clear_staging(ckpt_dir)  # a half-written checkpoint frees its space; it is never resumed anyway
            raise error from None
        state = trainer.state
        if self.stop.requested and state.global_step < state.max_steps:
            raise Interrupted(
                self.stop.signum,
                f"stopped by {self.stop.name} at step {state.global_step} of "
                f"{state.max_steps}: checkpoint in {latest_checkpoint(ckpt_dir)}; "
                "run the same command to resume",
            )
        return trainer, out_state, time.perf_counter() - t0, sampler.peaks()

    def _result(
        self, out: Path, trainer: Trainer, out_state: TrainOutput, seconds: float, peaks: dict[str, Any]
    ) -> tuple[TrainResult, dict[str, torch.Tensor] | None]:
        """The run's numbers, and the weights to save (ZeRO-3 gathers them: a collective on every rank)."""
        from app.training.callbacks import tokens_trained
        from app.training.trainer import final_eval_loss, full_state_dict

        eval_loss = final_eval_loss(trainer) if self.val_rows else None
        # accelerate wrapped forward() in the autocast of PRECISION; the trained model is handed back plain
        self.model = trainer.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        zero3 = dist.zero_stage(self.cfg) == 3
        dist.check_ranks_agree(self.model, trainer.state.global_step, zero3)
        weights = full_state_dict(trainer, zero3)  # None unless ZeRO-3
        train_loss = out_state.training_loss if self.resume_from is None else mean_logged_loss(out / METRICS)
        return TrainResult(
            out,
            trainer.state.global_step,
            round(train_loss, 6),
            None if eval_loss is None else round(eval_loss, 6),
            round(tokens_trained(trainer.state, self.resume_from) / max(seconds, 1e-9), 1),
            round(seconds, 2),
            round(max(peak_rss_mb(), peaks["peak_rss_mb"] or 0), 1),
        ), weights

    def _publish(
        self,
        out: Path,
        result: TrainResult,
        peaks: dict[str, Any],
        weights: dict[str, torch.Tensor] | None,
        previous: Path | None,
    ) -> None:
        try:
            ran = result.steps - (checkpoint_step(self.resume_from) if self.resume_from else 0)  # since the resume
            publish(self, out, out / CHECKPOINTS, result, peaks, weights, self.timing.summary(ran, result.seconds))
        except Exception as e:  # safetensors' and matplotlib's writers have their own errors
            err = write_error(e, out, "saving the final adapter", previous, self.disk.adapter)
            if err is e:  # not a full disk or an unwritable dir: the error as it is
                raise
            raise err from e
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # finished: the adapter supersedes them
        log.info(
            "done: %d steps in %.1fs, train loss %.4f%s, %.0f tokens/s, peak RSS %.0f MB -> %s",
            result.steps,
            result.seconds,
            result.train_loss,
            "" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}",
            result.tokens_per_s,
            result.peak_rss_mb,
            out,
        )
        r = self.records
        if r.get("left_out") and "MAX_SAMPLES" not in self.cfg.explicit:  # said at the start too
            log.warning(
                "trained on %d of the %d valid records (MAX_SAMPLES=%s: %s); MAX_SAMPLES=all uses every record",
                r["used"],
                r["valid"],
                r["max_samples"],
                r["why"],
            )

    def run(self) -> TrainResult:
        return self.setup().prepare_data().train()

    # ---- internals ------------------------------------------------------------------------
    def _train_with_backoff(
        self, out: Path, ckpt_dir: Path, sampler: MemorySampler, extra: list[TrainerCallback]
    ) -> tuple[Trainer, TrainOutput]:
        """Train; when the guard trips, resume from its checkpoint with half the micro-batch."""
        import torch

        from app.training.trainer import build_trainer

        guard, resume = self.guard, self.resume_from
        while True:
            resumed: list[dict[str, Any]] = []
            if resume:
                log.info(
                    "resuming from %s (optimizer, scheduler, RNG and data position; delete %s to start over)",
                    resume,
                    ckpt_dir,
                )
                resumed = truncate_metrics(out / METRICS, checkpoint_step(resume))
            trainer = build_trainer(
                self,
                out,
                ckpt_dir,
                self._ds_args or self._training_args(ckpt_dir),
                guard,
                [*extra, dist.rank_sync(guard, self.stop)],
                sampler,
                resumed,
            )
            self._ds_args = None  # used once: a back-off builds fresh arguments
            try:
                out_state = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
                if (
                    self.stop.requested
                    or not guard.tripped.is_set()
                    or trainer.state.global_step >= trainer.state.max_steps
                ):
                    return trainer, out_state
            except torch.OutOfMemoryError:  # CUDA raises instead of being killed: same remedy
                guard.trip_usage_mb = guard.limit_mb
            resume = latest_checkpoint(ckpt_dir)
            where = resume or "(none yet)"
            if guard.mode == "backoff" and self.cfg.train.batch_size > min_batch(self.cfg):
                batch, accum = halve_batch(self.cfg.train.batch_size, self.cfg.train.grad_accum)
                log.warning(
                    "memory guard: BATCH_SIZE -> %d, GRAD_ACCUM -> %d (same effective batch); resuming from %s",
                    batch,
                    accum,
                    where,
                )
                # the next Trainer and the checkpoints' settings use the new batch
                self.plan = self.plan.set("BATCH_SIZE", batch, "memory guard backed off").set(
                    "GRAD_ACCUM", accum, "memory guard backed off"
                )
                guard.reset()
                continue
            raise UserError(
                f"memory: usage reached {guard.trip_usage_mb:,.0f} MB of the {guard.limit_mb:,.0f} MB "
                f"limit; stopped with a checkpoint at {where}. Lower MAX_SEQ_LEN or BATCH_SIZE, or set "
                "QUANT_LEVEL=4bit / GRADIENT_CHECKPOINTING=on, then run again to resume"
            )

    def _training_args(self, ckpt_dir: Path) -> TrainingArguments:
        import torch

        from app.training.trainer import training_args

        cuda = torch.cuda.is_available()
        return training_args(self.cfg, ckpt_dir, bool(self.val_rows), resolve_precision(self.cfg, cuda), cuda)
