"""Evaluation: batched greedy generation over records with reference answers, then scoring.

`python -m app evaluate` generates an answer for every record app.evaluation.dataset picks (EVAL_PATH, else
the records the run held out) with the adapter (or full model), and scores them as their references call for
(app.evaluation.scoring.score_answers: triplet P/R/F1, or exact match / ROUGE-L / BLEU-4), plus the reference
answers' mean loss under the model. `python -m app evaluate --predictions FILE` scores an existing JSONL
without any model. Reports go to EVAL_DIR (default: eval/ inside the adapter dir, or beside FILE).

`F1Evaluator` is the same generation + triplet scoring as a Trainer callback (EVAL_METRIC=f1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from app.config import Config
from app.core.errors import UserError
from app.data.encode import IGNORE, Collator, encode
from app.data.records import Example
from app.inference.generate import generate_batch, max_new_tokens_for
from app.plan.train_timing import duration

if TYPE_CHECKING:
    from collections.abc import Callable

    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments

    from app.evaluation.eval_timing import EvalTime
    from app.inference.generate import CausalLM
    from app.inference.predict import Predictor

log = logging.getLogger(__name__)


def run_evaluate(cfg: Config) -> dict[str, Any]:
    from app.evaluation.dataset import eval_data
    from app.evaluation.reports import write_reports
    from app.evaluation.scoring import score_answers, score_file
    from app.inference.predict import Predictor
    from app.models.artifacts import find_adapter

    ev = cfg.evaluation
    out = report_dir(cfg)  # refused now, if it is a folder of yours, not after minutes of generating
    if ev.predictions:
        src = Path(ev.predictions)
        if not src.is_file():
            raise UserError(f"--predictions {src}: no such file")
        report = score_file(src)
        title = str(src)
    else:
        data = eval_data(cfg, find_adapter(cfg))  # before the model loads: a data problem costs no wait
        examples = data.examples
        pred = Predictor(cfg)
        log.info("%s", engine_time(pred, examples, cfg.predict.predict_batch_size).line())
        budget = max_new_tokens_for(pred.tokenizer, [e.answer for e in examples])
        log.info("generating at most %d new tokens per answer (the longest reference answer's, + 25%%)", budget)
        stats, start = {"new_tokens": 0}, time.perf_counter()
        outputs = generate_batch(
            pred.model,
            pred.tokenizer,
            [e.prompt_messages for e in examples],
            budget,
            cfg.predict.predict_batch_size,
            stats=stats,
        )
        took = time.perf_counter() - start
        log.info(
            "generated %d new tokens for %d answers in %s (%.1f tokens/s, PREDICT_BATCH_SIZE=%d at a time)",
            stats["new_tokens"],
            len(examples),
            duration(took),
            stats["new_tokens"] / max(took, 1e-9),
            cfg.predict.predict_batch_size,
        )
        report = score_answers(zip([e.answer for e in examples], outputs, strict=True))
        report.loss, losses = answer_loss(pred.model, pred.tokenizer, examples, data.max_seq_len)
        for row, e, loss in zip(report.rows, examples, losses, strict=True):
            row.update(prompt=e.prompt_messages[-1]["content"], line=e.line or None, loss=loss)
        title = f"{data.path} with {pred.adapter or cfg.model.model_name}"
    files = write_reports(report, out, title)
    log.info("%s on %d samples -> %s", report.headline(), report.n_samples, files["report.md"])
    return report.to_dict()


def engine_time(pred: Predictor, examples: list[Example], batch_size: int) -> EvalTime:
    """app/evaluation/eval_timing.py's estimate for the loaded Predictor's engine, its load done."""
    from app.evaluation.eval_timing import expected_evaluate, unknown
    from app.plan.estimator import model_shape

    backend, quant, base, gguf = pred.engine
    if backend not in ("torch", "llama.cpp"):
        return unknown(len(examples), f"no time model for {backend}")
    shape = model_shape(base, None, pred.cfg.model.trust_remote_code)
    return expected_evaluate(
        shape,
        pred.tokenizer,
        examples,
        backend,
        quant,
        batch_size,
        Path(gguf).stat().st_size if gguf else None,
        load=False,
    )


def report_dir(cfg: Config) -> Path:
    """EVAL_DIR, else eval/ in the adapter dir (OUTPUT_DIR for the base model), or <FILE>.eval/ beside the scored
    predictions: a new or empty folder, or one this tool wrote (app.core.ownership), checked before any work."""
    from app.evaluation.reports import REPORT_KIND
    from app.models.artifacts import find_adapter, output_problem

    ev = cfg.evaluation
    if ev.eval_dir:
        out = Path(ev.eval_dir)
    elif ev.predictions:
        out = Path(ev.predictions).parent / f"{Path(ev.predictions).stem}.eval"
    else:
        out = (find_adapter(cfg) or Path(cfg.train.output_dir)) / "eval"
    problem = output_problem(cfg, out, "EVAL_DIR", REPORT_KIND)
    if problem:
        raise UserError(problem)
    return out


def answer_loss(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_seq_len: int
) -> tuple[float | None, list[float | None]]:
    """(mean, per sample) cross-entropy of the reference answers given their prompts, teacher-forced: the
    tokens training puts loss on (app.data.encode: the answers and EOS, cut at ``max_seq_len`` as training
    cuts), each predicted from the ones before it. The mean is over all those tokens, as a training loss is
    token-weighted; a sample's own is the mean over its tokens (None where truncation left it none)."""
    import torch

    rows = [encode(e, tokenizer, max_seq_len) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    collate, sums, counts = Collator(pad), [0.0] * len(rows), [0] * len(rows)
    with torch.inference_mode():
        for batch_ids in _token_batches([len(r["input_ids"]) for r in rows], max_seq_len):
            batch = collate([rows[i] for i in batch_ids])
            logits = model(
                input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
            ).logits
            labels = batch["labels"][:, 1:].to(logits.device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
            )
            for j, i in enumerate(batch_ids):
                sums[i], counts[i] = float(nll[j].sum()), int((labels[j] != IGNORE).sum())
    total = sum(counts)
    return (sum(sums) / total if total else None), [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def _token_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Samples of similar length together, about ``budget`` tokens a batch (one sample when longer):
    the full-vocabulary logits of a batch then never outgrow those of one training sample at MAX_SEQ_LEN."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:  # sorted: this one is the batch's longest
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class F1Evaluator(TrainerCallback):
    """After each loss evaluation, generate on EVAL_SAMPLES dev records and log eval_f1.

    Runs before BestAdapter in the callback list, so the best checkpoint can be chosen by F1.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        examples: list[Example],
        batch_size: int = 8,
        write: Callable[[dict[str, Any]], None] | None = None,
    ):
        from app.evaluation.scoring import score

        self.tokenizer, self.examples, self.batch_size, self._score = tokenizer, examples, batch_size, score
        self.write = write  # MetricsJsonl.write: the Trainer logged this evaluation before we ran
        self.budget = max_new_tokens_for(tokenizer, [e.answer for e in examples])
        self.history: list[tuple[int, float]] = []

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict | None = None,
        model: PreTrainedModel | PeftModel | None = None,
        **kw: Any,
    ) -> None:
        if model is None:
            raise RuntimeError("on_evaluate without a model: the Trainer passes its model to every callback")
        outputs = generate_batch(
            model,
            self.tokenizer,
            [e.prompt_messages for e in self.examples],
            self.budget,
            self.batch_size,
            progress=False,
        )
        d = self._score(zip([e.answer for e in self.examples], outputs, strict=True)).to_dict()
        if metrics is not None:
            metrics.update(
                {
                    "eval_f1": d["triplet_f1"],
                    "eval_f1_typed": d["triplet_f1_typed"],
                    "eval_json_valid": d["json_valid_rate"],
                }
            )
        self.history.append((state.global_step, d["triplet_f1"]))
        row = {
            "step": state.global_step,
            "eval_f1": d["triplet_f1"],
            "eval_f1_typed": d["triplet_f1_typed"],
            "eval_json_valid": d["json_valid_rate"],
        }
        state.log_history.append(row)
        if self.write is not None:
            self.write(row)
        log.info(
            "step %d: eval F1 %.4f (typed %.4f), valid JSON %.0f%% on %d samples; first answer: %s",
            state.global_step,
            d["triplet_f1"],
            d["triplet_f1_typed"],
            100 * d["json_valid_rate"],
            len(self.examples),
            " ".join(outputs[0].split())[:160] if outputs else "-",
        )
