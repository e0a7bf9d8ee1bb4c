"""Evaluation: batched greedy generation over a dev file, scored as triplets / labels.

`python -m app evaluate` generates for every record of EVAL_PATH (default VAL_PATH, else
data/dev.jsonl) with the adapter (or full model) and scores with app.evaluation.scoring;
`python -m app evaluate --predictions FILE` scores an existing JSONL without any model.
Reports go to EVAL_DIR (default: eval/ inside the adapter dir, or beside FILE).

`F1Evaluator` is the same generation + scoring as a Trainer callback (EVAL_METRIC=f1).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from app.config import Config
from app.core.errors import UserError
from app.data.records import Example, read_examples
from app.inference.generate import generate_batch, max_new_tokens_for

log = logging.getLogger(__name__)


def eval_examples(cfg: Config) -> tuple[Path, list[Example]]:
    path = Path(cfg.evaluation.eval_path or cfg.data.val_path or "data/dev.jsonl")
    examples, _ = read_examples(path, cfg.data.data_format, cfg.data.max_bad_ratio, "EVAL_PATH")
    examples = [e for e in examples if e.messages]  # {text} records have no separate answer to score
    if not examples:
        raise UserError(f"EVAL_PATH={path}: no record with a prompt and an answer to score")
    if cfg.evaluation.eval_samples:
        examples = examples[: cfg.evaluation.eval_samples]
    return path, examples


def run_evaluate(cfg: Config) -> dict[str, Any]:
    from app.evaluation.reports import write_reports
    from app.evaluation.scoring import score, score_file
    from app.inference.predict import Predictor

    ev = cfg.evaluation
    if ev.predictions:
        src = Path(ev.predictions)
        if not src.is_file():
            raise UserError(f"--predictions {src}: no such file")
        report = score_file(src)
        out = Path(ev.eval_dir or src.parent / f"{src.stem}.eval")
        title = str(src)
    else:
        path, examples = eval_examples(cfg)
        pred = Predictor(cfg)
        budget = max_new_tokens_for(pred.tokenizer, [e.answer for e in examples])
        log.info("evaluating %d records of %s (max %d new tokens)", len(examples), path, budget)
        outputs = generate_batch(pred.model, pred.tokenizer, [e.prompt_messages for e in examples], budget,
                                 cfg.predict.predict_batch_size)
        report = score(zip([e.answer for e in examples], outputs))
        base = pred.adapter if pred.adapter is not None else Path(cfg.train.output_dir)
        out = Path(ev.eval_dir or base / "eval")
        title = f"{path} with {pred.adapter or cfg.model.model_name}"
    files = write_reports(report, out, title)
    d = report.to_dict()
    log.info("F1 %.4f (typed %.4f), P %.4f, R %.4f, classification accuracy %s, valid JSON %.1f%% on %d samples -> %s",
             d["triplet_f1"], d["triplet_f1_typed"], d["triplet_precision"], d["triplet_recall"],
             "-" if d["classification_accuracy"] is None else f"{d['classification_accuracy']:.4f}",
             100 * d["json_valid_rate"], d["n_samples"], files["report.md"])
    return d


class F1Evaluator(TrainerCallback):
    """After each loss evaluation, generate on EVAL_SAMPLES dev records and log eval_f1.

    Runs before BestAdapter in the callback list, so the best checkpoint can be chosen by F1.
    """

    def __init__(self, tokenizer: Any, examples: list[Example], batch_size: int = 8,
                 write: Any = None):
        from app.evaluation.scoring import score

        self.tokenizer, self.examples, self.batch_size, self._score = tokenizer, examples, batch_size, score
        self.write = write  # MetricsJsonl.write: the Trainer logged this evaluation before we ran
        self.budget = max_new_tokens_for(tokenizer, [e.answer for e in examples])
        self.history: list[tuple[int, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, model: Any = None,
                    **kw: Any) -> None:
        outputs = generate_batch(model, self.tokenizer, [e.prompt_messages for e in self.examples], self.budget,
                                 self.batch_size, progress=False)
        d = self._score(zip([e.answer for e in self.examples], outputs)).to_dict()
        if metrics is not None:
            metrics.update({"eval_f1": d["triplet_f1"], "eval_f1_typed": d["triplet_f1_typed"],
                            "eval_json_valid": d["json_valid_rate"]})
        self.history.append((state.global_step, d["triplet_f1"]))
        row = {"step": state.global_step, "eval_f1": d["triplet_f1"], "eval_f1_typed": d["triplet_f1_typed"],
               "eval_json_valid": d["json_valid_rate"]}
        state.log_history.append(row)
        if self.write is not None:
            self.write(row)
        log.info("step %d: eval F1 %.4f (typed %.4f), valid JSON %.0f%% on %d samples; first answer: %s",
                 state.global_step, d["triplet_f1"], d["triplet_f1_typed"], 100 * d["json_valid_rate"],
                 len(self.examples), " ".join(outputs[0].split())[:160] if outputs else "-")
