"""Training: one path for every method, driven by the HF Trainer.

Why the HF Trainer and not a hand-written loop: it already does gradient accumulation with
correct token-weighted loss, warmup + schedules, clipping, checkpoint/resume with optimizer
and RNG state, and torch.distributed / DeepSpeed launch, all of which later issues rely on.
What it lacks for this tool lives in app/callbacks.py.

Notebook use::

    from app import Config, FineTuner
    ft = FineTuner(Config.from_dict({"MODEL_NAME": "tiny", "MAX_SAMPLES": 50}))
    ft.setup(); ft.prepare_data(); result = ft.train()
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Config
from app.data import read_examples, sample_and_split
from app.encode import Collator, EncodeStats, encode_all
from app.errors import UserError
from app.modeling import apply_lora, load_model, load_tokenizer, resolve
from app.utils import LAST_RUN_FILE, atomic_write_text, peak_rss_mb, set_threads, staged_dir, write_json

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float
    seconds: float
    peak_rss_mb: float


class FineTuner:
    """setup() -> prepare_data() -> train(). Nothing is written to disk before train()."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self.model_path = ""
        self.tokenizer: Any = None
        self.model: Any = None
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.data_report: dict[str, Any] = {}

    # ---- steps -----------------------------------------------------------------------
    def setup(self) -> "FineTuner":
        """Threads and seed, tokenizer, base model, LoRA."""
        return self._setup_tokenizer()._setup_model()

    def _setup_tokenizer(self) -> "FineTuner":
        threads = set_threads(self.cfg.model.num_threads)
        self.model_path = resolve(self.cfg)
        log.info("loading %s (%d threads)", self.model_path, threads)
        self.tokenizer = load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
        return self

    def _setup_model(self) -> "FineTuner":
        from transformers import set_seed

        set_seed(self.cfg.train.seed)  # LoRA init is random: seed right before it
        model = load_model(self.model_path, self.cfg.model.trust_remote_code)
        model.config.use_cache = False  # the KV cache only costs memory during training
        self.model = apply_lora(model, self.cfg)
        return self

    def prepare_data(self) -> "FineTuner":
        """Read, sample, split and tokenise. Raises UserError before anything is written."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() before prepare_data()")
        d, seed = self.cfg.data, self.cfg.train.seed
        examples, report = read_examples(d.data_path, d.data_format, d.max_bad_ratio, "DATA_PATH")
        train_ex, val_ex = sample_and_split(examples, d.max_samples, d.val_size, seed, bool(d.val_path))
        reports = [report]
        if d.val_path:
            val_ex, vreport = read_examples(d.val_path, d.data_format, d.max_bad_ratio, "VAL_PATH")
            reports.append(vreport)
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
        self.data_report = {"sources": [r.summary() for r in reports], "train": _stats(tstats),
                            "validation": _stats(vstats)}
        return self

    def train(self, callbacks: list[Any] | None = None) -> TrainResult:
        """Run the Trainer; write adapter, tokenizer, config, metrics and plot to OUTPUT_DIR.

        ``callbacks``: extra transformers TrainerCallbacks (a notebook's own logging, say).
        A checkpoint left in OUTPUT_DIR/checkpoints by a killed run is resumed automatically.
        """
        if not self.train_rows:
            raise RuntimeError("call setup() and prepare_data() before train()")
        from transformers import Trainer
        from transformers.integrations import TensorBoardCallback
        from transformers.trainer_callback import ProgressCallback
        from torch.utils.tensorboard import SummaryWriter

        from app.callbacks import BestAdapter, MetricsJsonl, ProgressBar, Throughput, plot_losses

        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.cfg.save(out / "train_config.json")
        write_json(out / "data_report.json", self.data_report)
        metrics_path = out / "metrics.jsonl"
        ckpt_dir = out / "checkpoints"
        resume = _latest_checkpoint(ckpt_dir)
        if not resume:
            metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        tp = Throughput()
        trainer = Trainer(
            model=self.model, args=self._training_args(ckpt_dir), train_dataset=self.train_rows,
            eval_dataset=self.val_rows or None, data_collator=Collator(self.tokenizer.pad_token_id),
            callbacks=[ProgressBar(tp), MetricsJsonl(metrics_path, tp),
                       BestAdapter(out / "best", self.cfg.train.early_stopping_patience),
                       TensorBoardCallback(SummaryWriter(str(out / "runs"))), *(callbacks or [])],
        )
        trainer.remove_callback(ProgressCallback)  # ours adds loss and tokens/s to the bar
        if resume:
            log.info("resuming from %s (delete %s to start over)", resume, ckpt_dir)
        t0 = time.perf_counter()
        out_state = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - t0
        eval_loss = self._final_eval_loss(trainer)

        with staged_dir(out) as tmp:  # the final adapter appears whole or not at all
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        plot_losses(metrics_path, out / "loss_curve.png")
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the adapter supersedes them
        result = TrainResult(out, trainer.state.global_step, round(out_state.training_loss, 6),
                             None if eval_loss is None else round(eval_loss, 6),
                             round(trainer.state.num_input_tokens_seen / max(seconds, 1e-9), 1), round(seconds, 2),
                             round(peak_rss_mb(), 1))
        write_json(out / "summary.json", {k: str(v) if isinstance(v, Path) else v
                                          for k, v in result.__dict__.items()})
        atomic_write_text(LAST_RUN_FILE, str(out.resolve()) + "\n")
        log.info("done: %d steps in %.1fs, train loss %.4f%s, %.0f tokens/s, peak RSS %.0f MB -> %s",
                 result.steps, seconds, result.train_loss,
                 "" if eval_loss is None else f", eval loss {eval_loss:.4f}", result.tokens_per_s,
                 result.peak_rss_mb, out)
        return result

    def run(self) -> TrainResult:
        """Data problems surface before the (slow) model load, and nothing is written before train()."""
        return self._setup_tokenizer().prepare_data()._setup_model().train()

    # ---- internals ------------------------------------------------------------------------
    def _final_eval_loss(self, trainer: Any) -> float | None:
        """Eval loss at the last step: reuse the Trainer's if it just evaluated, else evaluate."""
        if not self.val_rows:
            return None
        for row in reversed(trainer.state.log_history):
            if "eval_loss" in row:
                if row.get("step") == trainer.state.global_step:
                    return row["eval_loss"]
                break
        return trainer.evaluate()["eval_loss"]

    def _training_args(self, ckpt_dir: Path) -> Any:
        import torch
        from transformers import TrainingArguments

        t, cuda = self.cfg.train, torch.cuda.is_available()
        has_val = bool(self.val_rows)
        return TrainingArguments(
            output_dir=str(ckpt_dir), num_train_epochs=t.num_epochs, max_steps=t.max_steps or -1,
            per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm or None, optim=t.optim, seed=t.seed, data_seed=t.seed,
            logging_steps=t.logging_steps, logging_first_step=True,
            eval_strategy="steps" if has_val else "no", eval_steps=t.eval_steps,
            save_strategy="steps", save_steps=t.save_steps, save_total_limit=2,
            include_num_input_tokens_seen="non_padding", report_to="none", use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(), remove_unused_columns=False,
            dataloader_num_workers=0, disable_tqdm=False, log_level="error",
        )


def _latest_checkpoint(ckpt_dir: Path) -> str | None:
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def _stats(s: EncodeStats) -> dict[str, Any]:
    lengths = sorted(s.lengths)
    return {"samples": s.samples, "tokens": s.tokens, "prompt_truncated": s.prompt_truncated,
            "answer_truncated": s.answer_truncated,
            "median_len": lengths[len(lengths) // 2] if lengths else 0, "max_len": lengths[-1] if lengths else 0}
