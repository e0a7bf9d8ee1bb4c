"""The HF Trainer with every override this tool needs, in one class.

Why subclass and not callbacks: these change how the Trainer saves, resumes and counts, which no
callback hook reaches. Each override is of a private method, so ``OVERRIDES`` records the
signature each was written against (transformers 5.23) and tests/training/test_trainer_contract.py fails,
naming the method, when a transformers upgrade renames or reshapes one, instead of the override
silently no longer being called.

- Checkpoints whole or not at all (app.training.checkpoints): every rank writes into
  ``checkpoints/.incomplete/checkpoint-N``; rank 0 adds the run's settings (app.training.resume),
  seals and renames it.
- Resume: the intervals asked for now apply (the Trainer keeps the checkpoint's), a step count
  below the checkpoint's is refused, and a checkpoint at the last step trains nothing more.
- Packing (app.data.encode.PackingCollator): a packed batch's real token count, and no KV cache
  so the packed-sequence mask holds in evaluation too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Sampler
from transformers import Trainer, TrainingArguments

from app.core.atomic import write_json
from app.core.errors import UserError
from app.data.cache import CachedRows
from app.training import dist
from app.training.checkpoints import PREFIX, STAGING, rotate, seal
from app.training.resume import SETTINGS_FILE

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset
    from transformers import TrainerCallback

    from app.config import Config
    from app.training.guard import MemoryGuard
    from app.training.sampler import MemorySampler

log = logging.getLogger(__name__)

# method -> the parameters of transformers.Trainer's own method that the override was written for
OVERRIDES = {
    "_run_epoch": (
        "self",
        "model",
        "epoch",
        "train_dataloader",
        "steps_in_epoch",
        "num_update_steps_per_epoch",
        "trial",
        "ignore_keys_for_eval",
        "start_time",
        "resume_from_checkpoint",
        "epochs_trained",
        "steps_trained_in_current_epoch",
    ),
    "_get_output_dir": ("self", "trial"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_track_num_input_tokens": ("self", "inputs"),
    "compute_loss": ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    "_get_train_sampler": ("self", "train_dataset"),
}


class RunMixin:
    """The overrides below, for the HF Trainer and for TRL's preference trainers alike
    (app/training/preference_trainer.py puts this mixin before theirs). ``run_settings()``: what a checkpoint
    records of the run (app.training.resume.snapshot)."""

    def __init__(self, *args: Any, run_settings: Callable[[], dict[str, Any]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._run_settings = run_settings
        self._staging = False

    # ---- resume -----------------------------------------------------------------------------------
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # A resumed state carries the checkpoint's logging/eval/save intervals, and the Trainer
        # would keep them: the SAVE_STEPS, EVAL_STEPS, LOGGING_STEPS asked for now apply instead.
        self.state.compute_steps(self.args, self.state.max_steps)
        if 0 < self.state.max_steps < self.state.global_step:  # app.training.resume refuses this before loading
            raise UserError(
                f"resumed at step {self.state.global_step}, but NUM_EPOCHS/MAX_STEPS now give "
                f"{self.state.max_steps} steps: nothing is left to train. Raise them to continue "
                "the run, or set OVERWRITE=1 (or another OUTPUT_DIR) to train anew"
            )
        # Resumed from a checkpoint at the last step (the final save failed, or a stop came at
        # the very end): nothing is left to train. The Trainer would still run one more step.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- checkpoints, whole or absent ---------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX}{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        dist.barrier()  # every rank's files (its RNG state at least) are in the staging dir
        if self.args.should_save:
            write_json(run_dir / STAGING / name / SETTINGS_FILE, self._run_settings())
            seal(run_dir / STAGING / name, run_dir / name, self.state.global_step)
            rotate(run_dir, self.args.save_total_limit or 0)
        dist.barrier()

    # ---- the token cache's rows, any number of them -----------------------------------------------
    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        # Only the cache's rows: a MAX_SAMPLES sample is in memory anyway, and RandomSampler's order is what its
        # golden losses and resumes were recorded with.
        if isinstance(dataset, CachedRows):
            return LazyShuffle(len(dataset), self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ---- packed batches ---------------------------------------------------------------------------
    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # ``num_tokens`` carries a packed batch's real token count (it has no attention_mask to
        # count from, and its padded tails are pad tokens); taken out before the model sees it.
        n = inputs.pop("num_tokens", None)
        if n is None and "chosen_attention_mask" in inputs:  # ORPO's and CPO's pairs: both sides are trained on
            n = int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
        if n is None or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        import torch

        n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs.pop("num_tokens", None)
        if "position_ids" in inputs:  # packed: keep transformers on the packed-sequence mask
            inputs["use_cache"] = False
        return super().compute_loss(model, inputs, *args, **kwargs)


class RunTrainer(RunMixin, Trainer):
    """The HF Trainer with the tool's overrides: every STAGE=sft run."""


class LazyShuffle(Sampler[int]):
    """A new random order of range(n) each epoch (SEED, epoch), made one index at a time: torch's RandomSampler
    lists the whole permutation as Python ints, ~36 bytes a row (about 1 GB at a 20 GB file's 30M rows).

    A 4-round Feistel network permutes [0, 2^k) for the smallest even k with 2^k >= n; indices >= n are
    skipped (cycle walking), so each row comes exactly once. The same (SEED, epoch) gives the same order,
    which is what resuming mid-epoch relies on."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        import random

        bits = max(2, (self.n - 1).bit_length())
        half = (bits + 1) // 2
        mask = (1 << half) - 1
        keys = random.Random(self.seed * 1_000_003 + self.epoch).sample(range(1 << 32), 4)
        for i in range(1 << (2 * half)):
            left, right = i >> half, i & mask
            for k in keys:
                left, right = right, left ^ ((((right ^ k) * 0x9E3779B1) >> 7) & mask)
            j = (left << half) | right
            if j < self.n:
                yield j


def training_args(cfg: Config, ckpt_dir: Path, has_val: bool, precision: str, cuda: bool) -> TrainingArguments:
    """The Trainer's arguments for this run's (planned) settings; checkpoints go to ``ckpt_dir``. STAGE=dpo/kto:
    the same, in the config of the stage's TRL trainer (app/training/preference_trainer.py)."""
    t = cfg.train
    kw = dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm or None,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_val else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        use_cpu=not cuda,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        remove_unused_columns=False,
        # batches are collated in the training process: a worker would take a core from the matmuls
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        torch_compile=t.torch_compile,
        disable_tqdm=False,
        log_level="error",
        neftune_noise_alpha=t.neftune_alpha or None,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient (LoRA, prefixes, full)
        deepspeed=cfg.distributed.ds_config or None,
    )
    if t.stage != "sft":
        from app.training.preference_trainer import pref_config

        return pref_config(cfg, kw)
    return TrainingArguments(**kw)


def final_eval_loss(trainer: Trainer) -> float:
    """Eval loss at the last step: the Trainer's own if it just evaluated, else a fresh evaluation."""
    for row in reversed(trainer.state.log_history):
        if "eval_loss" in row:
            if row.get("step") == trainer.state.global_step:
                return row["eval_loss"]
            break
    return trainer.evaluate()["eval_loss"]


def build_trainer(
    ft: Any,
    out: Path,
    ckpt_dir: Path,
    args: TrainingArguments,
    guard: MemoryGuard,
    tail: list[TrainerCallback],
    sampler: MemorySampler,
    resumed: list[dict[str, Any]] | None,
) -> Trainer:
    """The RunTrainer for FineTuner ``ft`` (model, rows, planned settings), with the tool's callbacks in
    this order: the progress bar, metrics.jsonl, F1 on generated answers (EVAL_METRIC=f1), the best
    adapter and early stopping, the memory ``guard``, TensorBoard on rank 0, then ``tail`` (the
    caller's callbacks and the ranks' agreement, last)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import ProgressCallback

    from app.plan.precision import resolve_precision
    from app.training import trackers
    from app.training.callbacks import BestAdapter, MetricsJsonl, ProgressBar, Throughput
    from app.training.kernels import collator
    from app.training.outputs import METRICS
    from app.training.resume import snapshot

    cfg = ft.cfg
    tp = Throughput()
    metrics = MetricsJsonl(out / METRICS, tp, sampler, ft.plan.budget_mb)
    f1: list[TrainerCallback] = []
    if cfg.evaluation.eval_metric == "f1" and not ft.val_examples:
        log.warning("EVAL_METRIC=f1 needs validation records with answers; choosing the best by eval loss")
    if cfg.evaluation.eval_metric == "f1" and ft.val_examples:
        from app.evaluation.evaluate import F1Evaluator

        n = cfg.evaluation.eval_samples or 32  # generation is slow: a capped, fixed subset
        f1 = [F1Evaluator(ft.tokenizer, ft.val_examples[:n], cfg.predict.predict_batch_size, metrics.write)]
    holder: list[Trainer] = []  # the trainer, for ZeRO-3's weight gathering in BestAdapter
    zero3 = dist.zero_stage(cfg) == 3
    gather = (lambda: full_state_dict(holder[0], zero3)) if zero3 else None
    names = trackers.chosen(cfg.train.report_to)
    board = [TensorBoardCallback(SummaryWriter(str(out / "runs")))] if dist.is_main() and "tensorboard" in names else []
    board += trackers.callbacks(names, out) if dist.is_main() else []  # W&B, MLflow, Trackio, SwanLab
    metrics.trackers = board  # F1 on generated answers reaches them too (it is computed after the Trainer logs)
    if cfg.train.stage == "sft":
        cls: type[Trainer] = RunTrainer
        data = dict(
            train_dataset=ft.train_rows,
            eval_dataset=ft.val_rows or None,
            data_collator=collator(cfg, ft.model, ft.tokenizer, resolve_precision(cfg, ft.plan.device == "cuda")),
        )
    else:  # TRL's trainer for the stage, its collator, and its rows as a datasets.Dataset
        from app.training.preference_trainer import as_dataset, pref_trainer_class, pref_trainer_kwargs

        cls = pref_trainer_class(cfg, RunMixin)
        data = dict(
            train_dataset=as_dataset(ft.train_rows),
            eval_dataset=as_dataset(ft.val_rows),
            run_cfg=cfg,
            **pref_trainer_kwargs(ft),
        )
    trainer = cls(
        model=ft.model,
        args=args,
        **data,
        run_settings=lambda: snapshot(ft.cfg, dist.world_size(), ft._data_fp),
        callbacks=[
            ProgressBar(tp),
            metrics,
            *f1,  # metrics before the trackers: it adds tokens/s and memory
            BestAdapter(
                ckpt_dir / "best", cfg.train.early_stopping_patience, "eval_f1" if f1 else "eval_loss", resumed, gather
            ),
            guard,
            *board,
            *tail,
        ],
    )
    holder.append(trainer)
    trainer.remove_callback(ProgressCallback)  # ours adds loss and tokens/s to the bar
    return trainer


def full_state_dict(trainer: Trainer, zero3: bool) -> dict[str, torch.Tensor] | None:
    """Under ZeRO-3 every rank holds a shard: the full weights, gathered (every rank calls this); else None."""
    return trainer.accelerator.get_state_dict(trainer.deepspeed) if zero3 else None
