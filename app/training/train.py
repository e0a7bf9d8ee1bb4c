"""Training: one path for every method, driven by the HF Trainer.

Why the HF Trainer and not a hand-written loop: it already does gradient accumulation with
correct token-weighted loss, warmup + schedules, clipping, checkpoint/resume with optimizer
and RNG state, and torch.distributed / DeepSpeed launch, all of which later issues rely on.
What it lacks for this tool lives in app/training/callbacks.py.

Notebook use::

    from app import Config, FineTuner
    ft = FineTuner(Config.from_dict({"MODEL_NAME": "tiny", "MAX_SAMPLES": 50}))
    ft.setup(); ft.prepare_data(); result = ft.train()
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from app.config import Config
from app.core.errors import UserError
from app.core.utils import peak_rss_mb, set_threads
from app.data.encode import encode_all
from app.data.records import read_examples, sample_and_split
from app.models.loading import apply_lora, apply_ptuning, load_model, load_tokenizer, resolve
from app.plan.precision import bf16_frozen_weights, packing_choice, resolve_precision
from app.plan.tiers import halve_batch
from app.training import dist, runlock
from app.training.checkpoints import CHECKPOINTS, check_output_dir, clear_staging, finished_run, latest_checkpoint
from app.training.kernels import collator, fast_lora_dropout, lora_inputs_stay_bf16, use_packed_attention
from app.training.outputs import (METRICS, TrainResult, encode_stats, mean_logged_loss, publish, truncate_metrics,
                                  write_error)
from app.training.resume import checkpoint_step, data_fingerprints, decide

log = logging.getLogger(__name__)

class FineTuner:
    """setup() -> prepare_data() -> train(). Nothing is written to disk before train().

    setup: resources, tier, tokenizer and the model's shape (no weights yet);
    prepare_data: read, sample, tokenise, then fit sequence length / batch to memory;
    load_model: weights (quantized as planned) + LoRA; train() calls it if you did not.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg  # frozen: each planning step below makes a new one (self.plan.cfg)
        self.model_path = ""
        self.tokenizer: Any = None
        self.model: Any = None
        self.resources: Any = None
        self.plan: Any = None
        self.shape: Any = None
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.val_examples: list[Any] = []
        self.data_report: dict[str, Any] = {}
        self.records: dict[str, Any] = {}  # how many of the data's records the run uses, and why
        self.guard: Any = None
        self.stop: Any = None  # app.training.signals.StopRequest while train() runs
        self.resume_from: Path | None = None  # RESUME's checkpoint, checked against these settings (setup)
        self._discard = False  # OVERWRITE=1 over an unfinished run of other settings: its checkpoints go
        self._data_fp: dict[str, Any] = {}  # the data's fingerprints at the start, recorded in each checkpoint
        self._ds_args: Any = None  # TrainingArguments made before loading, for DeepSpeed ZeRO-3

    # ---- steps -----------------------------------------------------------------------
    def setup(self) -> "FineTuner":
        from app.plan.estimator import model_shape
        from app.plan.resources import detect_resources
        from app.plan.tiers import apply_tier

        self.resources = detect_resources(self.cfg.resources.memory_limit_mb)
        procs = dist.local_world_size()
        if procs > 1 and not self.resources.gpus:  # ranks on one machine share its RAM (each has its own GPU)
            import dataclasses

            self.resources = dataclasses.replace(self.resources,
                                                 ram_available_mb=self.resources.ram_available_mb / procs)
        self.plan = apply_tier(self.cfg, self.resources, self._resume_plan())
        self.cfg = self.plan.cfg  # the user's settings with the tier's decisions
        if self.plan.device == "cuda" and dist.distributed():
            import torch

            torch.cuda.set_device(dist.local_rank())  # one GPU per local rank; load_model places weights there
        dist.check_ds_config(self.cfg, cuda=self.plan.device == "cuda")
        threads = set_threads(self.cfg.model.num_threads or max(1, self.resources.cpus // procs))
        self.model_path = resolve(self.cfg)
        r = self.resources
        log.info("RAM %.1f GB (%s), %.1f GB available, %d CPUs%s; tier %s; loading %s (%d threads)",
                 r.ram_total_mb / 1024, r.limit_source, r.ram_available_mb / 1024, r.cpus,
                 "".join(f", GPU {g.name} {g.total_mb / 1024:.0f} GB" for g in r.gpus), self.plan.tier,
                 self.model_path, threads)
        self.tokenizer = load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
        self.shape = model_shape(self.model_path, self.cfg.lora.lora_targets or None, self.cfg.model.trust_remote_code)
        return self

    def _resume_plan(self) -> Any:
        """The checkpoint this run continues (RESUME), checked against these settings (app/training/resume.py);
        the settings the tier chose for it are kept. Returns the Plan the tier builds on."""
        from app.plan.tiers import Plan

        plan, (rc, discard) = Plan(), decide(self.cfg)
        self.resume_from, self._discard = None, discard
        if rc is None:
            return plan
        if discard:
            log.warning("OVERWRITE=1: the unfinished run in %s (%s, step %d) cannot continue as asked (%s); "
                        "training anew, and its checkpoints are removed when training starts",
                        self.cfg.train.output_dir, rc.checkpoint.name, rc.step, "; ".join(rc.differences))
            return plan
        rc.log()
        self.cfg = self.cfg.replace(rc.kept, explicit=rc.kept)  # planned once, when the run started: not again
        plan.held.update({var: f"kept from {rc.checkpoint.name} (resumed)" for var in rc.kept})
        self.resume_from = rc.checkpoint
        return plan

    def prepare_data(self) -> "FineTuner":
        """Read, sample, split and tokenise; fit MAX_SEQ_LEN/batch to memory. Writes nothing."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() before prepare_data()")
        from app.plan.tiers import fit_memory

        d, seed = self.cfg.data, self.cfg.train.seed
        examples, report = read_examples(d.data_path, d.data_format, d.max_bad_ratio, "DATA_PATH")
        train_ex, val_ex = sample_and_split(examples, d.max_samples, d.val_size, seed, bool(d.val_path))
        self.records = self._records_used(len(examples), len(train_ex), len(val_ex))
        reports = [report]
        if d.val_path:
            val_ex, vreport = read_examples(d.val_path, d.data_format, d.max_bad_ratio, "VAL_PATH")
            reports.append(vreport)
        lengths = None
        if "MAX_SEQ_LEN" not in self.cfg.explicit and self.plan.tier != "none":  # measure whole samples before the cut
            _, full = encode_all(train_ex, self.tokenizer, self.shape.max_positions)
            lengths = full.lengths
        self.cfg = fit_memory(self.plan, self.resources, self.shape, lengths).cfg
        d = self.cfg.data
        self._tune_allocator()
        for w in self.plan.warnings:
            log.warning("%s", w)
        self.val_examples = [e for e in val_ex if e.messages]
        self.train_rows, tstats = encode_all(train_ex, self.tokenizer, d.max_seq_len)
        self.val_rows, vstats = encode_all(val_ex, self.tokenizer, d.max_seq_len)
        if not self.train_rows:
            raise UserError(f"DATA_PATH={d.data_path}: no sample keeps any answer token within "
                            f"MAX_SEQ_LEN={d.max_seq_len}; raise MAX_SEQ_LEN")
        for r in reports:
            log.info("%s", r.summary())
        log.info("train: %s", tstats.summary(d.max_seq_len))
        if val_ex:
            log.info("validation: %s", vstats.summary(d.max_seq_len))
        log.info("plan: %s", ", ".join(f"{k}={v}" for k, (v, _) in self.plan.decisions.items()))
        self.data_report = {"sources": [r.summary() for r in reports], "records": self.records,
                            "train": encode_stats(tstats), "validation": encode_stats(vstats)}
        return self

    def _records_used(self, valid: int, n_train: int, n_val: int) -> dict[str, Any]:
        """How many of the file's valid records this run uses. When the tier (not the user) set a
        MAX_SAMPLES that leaves records out, that is a WARNING, now and in summary.json: the user
        asked to train on a file, and gets part of it."""
        d = self.cfg.data
        used = min(valid, d.max_samples) if d.max_samples is not None else valid
        why = "set by you" if "MAX_SAMPLES" in self.cfg.explicit else \
            self.plan.decisions.get("MAX_SAMPLES", (None, "default"))[1]
        records = {"valid": valid, "used": used, "train": n_train, "validation": n_val, "left_out": valid - used,
                   "max_samples": d.max_samples, "why": why}
        if used < valid:
            held = "" if d.val_path else f", {n_val} of them held out for validation"
            note = (f"DATA_PATH={d.data_path}: using {used:,} of its {valid:,} valid records (MAX_SAMPLES={used}: "
                    f"{why}){held}; {valid - used:,} records are left out")
            if "MAX_SAMPLES" in self.cfg.explicit:
                log.info("%s", note)
            else:
                self.plan.warnings.append(f"{note}. Set MAX_SAMPLES=all to train on every record")
        return records

    def _tune_allocator(self) -> None:
        """RELEASE_MEMORY, decided from the predicted peak (app/memory_monitor.release_memory)."""
        from app.plan.resources import release_memory
        from app.plan.tiers import predict_peak

        cuda = self.plan.device == "cuda"
        release_memory(self.cfg.resources.release_memory, cuda, predict_peak(self.cfg, self.shape, cuda).total_mb,
                       self.plan.budget_mb)

    def load_model(self) -> "FineTuner":
        """Weights (quantized as planned) + LoRA, seeded so LoRA's init is reproducible."""
        from transformers import set_seed

        from app.models.quantization import describe, prepare_for_training, stored_bytes

        r = self.cfg.resources
        quant, ckpt = r.quant_level, r.gradient_checkpointing == "on"
        if self.cfg.distributed.ds_config:  # ZeRO-3 partitions the weights as they load: its config comes first
            self._ds_args = self._training_args(Path(self.cfg.train.output_dir) / CHECKPOINTS)
        set_seed(self.cfg.train.seed)
        half = bf16_frozen_weights(self.cfg, self._precision(self.plan.device == "cuda"), self.plan.device == "cuda")
        model = load_model(self.model_path, self.cfg.model.trust_remote_code, quant, bf16=half)
        log.info("weights: %s, %.0f MB stored", describe(quant, self.plan.device == "cuda"),
                 stored_bytes(model) / 2**20)
        model.config.use_cache = False  # the KV cache only costs memory during training
        if packing_choice(self.cfg, getattr(model.config, "model_type", None))[0]:
            use_packed_attention(model)  # per-sample causal attention in packed rows (app/training/kernels.py)
        model = prepare_for_training(model, quant, ckpt)
        if ckpt and quant == "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if self.cfg.lora.method == "full":
            model.requires_grad_(True)
            log.info("full fine-tuning: %s trainable parameters", f"{sum(p.numel() for p in model.parameters()):,}")
            self.model = model
        elif self.cfg.lora.method == "ptuning":
            self.model = apply_ptuning(model, self.cfg)
        else:
            self.model = apply_lora(model, self.cfg)
            fast_lora_dropout(self.model)  # the same dropout, a quarter of a CPU step cheaper (app/training/kernels.py)
            if half:
                lora_inputs_stay_bf16(self.model)
        return self

    def train(self, callbacks: list[Any] | None = None) -> TrainResult:
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

    def _train(self, out: Path, callbacks: list[Any] | None) -> TrainResult:
        check_output_dir(self.cfg)  # writable, and no finished run replaced unasked: before loading weights
        self._data_fp = data_fingerprints(self.cfg)
        if self.model is None:
            self.load_model()
        from app.training.sampler import MemorySampler
        from app.training.guard import MemoryGuard
        from app.training.signals import Interrupted, stop_callback, stop_on_signal

        ckpt_dir = out / CHECKPOINTS
        main = dist.is_main()  # only rank 0 writes outputs (a plain single process is rank 0)
        previous = finished_run(out) if out.is_dir() else None
        if main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(e, out, "creating OUTPUT_DIR", previous) from None
            clear_staging(ckpt_dir)  # debris of a checkpoint that was being written when a run died
            if self._discard and ckpt_dir.is_dir():  # OVERWRITE=1 asked for a new run in its place
                shutil.rmtree(ckpt_dir)
                log.info("removed the unfinished run's checkpoints in %s (OVERWRITE=1)", ckpt_dir)
        resume = self.resume_from
        if main and (resume is None or ckpt_dir.resolve() != resume.resolve().parent):
            (out / METRICS).unlink(missing_ok=True)  # a fresh run (or one from elsewhere) starts a fresh log
        limit = self.resources.gpus[0].total_mb if self.plan.device == "cuda" else self.resources.ram_total_mb
        guard = self.guard = MemoryGuard(limit, self.cfg.resources.memory_guard)
        self.cfg = self.plan.cfg = guard.preflight(self.cfg, self._predicted_mb)
        t0 = time.perf_counter()
        # SIGTERM/SIGINT while training: checkpoint at the end of the step, then stop (app/training/signals.py)
        try:
            with MemorySampler(on_sample=guard.on_sample) as sampler, stop_on_signal() as self.stop:
                trainer, out_state = self._train_with_backoff(out, ckpt_dir, guard, sampler, resume,
                                                              [*(callbacks or []), stop_callback(self.stop)])
        except OSError as e:
            if main:
                clear_staging(ckpt_dir)  # a half-written checkpoint frees its space; it is never resumed anyway
            raise write_error(e, out, "writing a checkpoint or the training logs", previous) from None
        if self.stop.requested and trainer.state.global_step < trainer.state.max_steps:
            raise Interrupted(self.stop.signum, f"stopped by {self.stop.name} at step {trainer.state.global_step} "
                                                f"of {trainer.state.max_steps}: checkpoint in "
                                                f"{latest_checkpoint(ckpt_dir)}; run the same command to resume")
        seconds = time.perf_counter() - t0
        eval_loss = self._final_eval_loss(trainer)
        # accelerate wrapped forward() in the autocast of PRECISION; the trained model is handed back plain
        self.model = trainer.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        dist.check_ranks_agree(self.model, trainer.state.global_step, self._zero3())
        weights = self._full_state_dict(trainer)  # collective under ZeRO-3 (every rank), else None
        peaks = sampler.peaks()
        train_loss = out_state.training_loss if resume is None else mean_logged_loss(out / METRICS)
        result = TrainResult(out, trainer.state.global_step, round(train_loss, 6),
                             None if eval_loss is None else round(eval_loss, 6),
                             round(trainer.state.num_input_tokens_seen / max(seconds, 1e-9), 1), round(seconds, 2),
                             round(max(peak_rss_mb(), peaks["peak_rss_mb"] or 0), 1))
        if main:
            try:
                publish(self, out, ckpt_dir, result, peaks, weights)
            except OSError as e:
                raise write_error(e, out, "saving the final adapter", previous) from None
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the adapter supersedes them
            log.info("done: %d steps in %.1fs, train loss %.4f%s, %.0f tokens/s, peak RSS %.0f MB -> %s",
                     result.steps, seconds, result.train_loss,
                     "" if eval_loss is None else f", eval loss {eval_loss:.4f}", result.tokens_per_s,
                     result.peak_rss_mb, out)
            if self.records.get("left_out") and "MAX_SAMPLES" not in self.cfg.explicit:  # said at the start too
                log.warning("trained on %d of the %d valid records (MAX_SAMPLES=%s: %s); MAX_SAMPLES=all uses "
                            "every record", self.records["used"], self.records["valid"], self.records["max_samples"],
                            self.records["why"])
        dist.barrier()  # the other ranks return once rank 0's outputs are complete
        return result

    def run(self) -> TrainResult:
        return self.setup().prepare_data().train()

    # ---- internals ------------------------------------------------------------------------
    def _predicted_mb(self, cfg: Config) -> float:
        from app.plan.tiers import predict_peak

        return predict_peak(cfg, self.shape, self.plan.device == "cuda").total_mb

    def _train_with_backoff(self, out: Path, ckpt_dir: Path, guard: Any, sampler: Any, resume: Path | None,
                            extra: list[Any]) -> tuple[Any, Any]:
        """Train; when the guard trips, resume from its checkpoint with half the micro-batch."""
        import torch

        while True:
            resumed: list[dict[str, Any]] = []
            if resume:
                log.info("resuming from %s (optimizer, scheduler, RNG and data position; delete %s to start "
                         "over)", resume, ckpt_dir)
                resumed = truncate_metrics(out / METRICS, checkpoint_step(resume))
            trainer = self._trainer(out, ckpt_dir, guard, sampler, extra, resumed)
            try:
                out_state = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
                if (self.stop.requested or not guard.tripped.is_set()
                        or trainer.state.global_step >= trainer.state.max_steps):
                    return trainer, out_state
            except torch.OutOfMemoryError:  # CUDA raises instead of being killed: same remedy
                guard.trip_usage_mb = guard.limit_mb
            resume = latest_checkpoint(ckpt_dir)
            where = resume or "(none yet)"
            if guard.mode == "backoff" and self.cfg.train.batch_size > 1:
                batch, accum = halve_batch(self.cfg.train.batch_size, self.cfg.train.grad_accum)
                log.warning("memory guard: BATCH_SIZE -> %d, GRAD_ACCUM -> %d (same effective batch); "
                            "resuming from %s", batch, accum, where)
                self.plan.set("BATCH_SIZE", batch, "memory guard backed off")
                self.plan.set("GRAD_ACCUM", accum, "memory guard backed off")
                self.cfg = self.plan.cfg  # the next Trainer and the checkpoints' settings use the new batch
                guard.reset()
                continue
            raise UserError(f"memory: usage reached {guard.trip_usage_mb:,.0f} MB of the {guard.limit_mb:,.0f} MB "
                            f"limit; stopped with a checkpoint at {where}. Lower MAX_SEQ_LEN or BATCH_SIZE, or set "
                            "QUANT_LEVEL=4bit / GRADIENT_CHECKPOINTING=on, then run again to resume")

    def _zero3(self) -> bool:
        return dist.zero_stage(self.cfg) == 3

    def _full_state_dict(self, trainer: Any) -> Any:
        from app.training.trainer import full_state_dict

        return full_state_dict(trainer, self._zero3())

    def _trainer(self, out: Path, ckpt_dir: Path, guard: Any, sampler: Any, extra: list[Any],
                 resumed: list[dict[str, Any]] | None = None) -> Any:
        from app.training.trainer import build_trainer

        trainer = build_trainer(self, out, ckpt_dir, self._ds_args or self._training_args(ckpt_dir), guard,
                                [*extra, dist.rank_sync(guard, self.stop)], sampler, resumed)
        self._ds_args = None  # used once: a back-off builds fresh arguments
        return trainer

    def _final_eval_loss(self, trainer: Any) -> float | None:
        from app.training.trainer import final_eval_loss

        return final_eval_loss(trainer) if self.val_rows else None

    def _collator(self) -> Any:
        return collator(self.cfg, self.model, self.tokenizer, self._precision(self.plan.device == "cuda"))

    def _precision(self, cuda: bool) -> str:
        return resolve_precision(self.cfg, cuda)

    def _training_args(self, ckpt_dir: Path) -> Any:
        import torch

        from app.training.trainer import training_args

        cuda = torch.cuda.is_available()
        return training_args(self.cfg, ckpt_dir, bool(self.val_rows), self._precision(cuda), cuda)
