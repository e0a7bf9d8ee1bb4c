"""Evaluation: batched greedy generation over a dev file, scored as triplets / labels.

`python -m app evaluate` generates for every record of EVAL_PATH (default VAL_PATH, else
data/dev.jsonl) with the adapter (or full model) and scores with app.scoring;
`python -m app evaluate --predictions FILE` scores an existing JSONL without any model.
Reports go to EVAL_DIR (default: eval/ inside the adapter dir, or beside FILE).

`F1Evaluator` is the same generation + scoring as a Trainer callback (EVAL_METRIC=f1).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from app.config import Config
from app.data import Example, read_examples
from app.encode import prompt_text
from app.errors import UserError

log = logging.getLogger(__name__)


def max_new_tokens_for(tokenizer: Any, answers: list[str], cap: int = 1024) -> int:
    """Long enough for the longest gold answer (+25% and EOS), so no answer is cut by the budget."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=16)
    return min(cap, math.ceil(longest * 1.25) + 8)


def generate_batch(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
                   batch_size: int = 8, progress: bool = True, sampling: dict[str, Any] | None = None,
                   stats: dict[str, int] | None = None) -> list[str]:
    """Answers for many prompts, in their order, KV-cached and left-padded in batches (decoder-only
    models pad left). Prompts of similar length are batched together, so little is padding.

    Greedy unless ``sampling`` (generate's do_sample/temperature) says otherwise; ``stats["new_tokens"]``
    accumulates the tokens generated (finished rows' padding not counted).
    """
    import torch
    from tqdm.auto import tqdm

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [prompt_text(tokenizer, c) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))  # characters: a token-count proxy
    outputs: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for i in tqdm(starts, desc="generate", unit="batch", disable=not progress, leave=False):
            batch = order[i:i + batch_size]
            enc = tokenizer([texts[j] for j in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, **(sampling or {"do_sample": False}))
            new = out[:, enc["input_ids"].shape[1]:]
            if stats is not None:
                stats["new_tokens"] = stats.get("new_tokens", 0) + int((new != tokenizer.pad_token_id).sum())
            for j, answer in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[j] = answer
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return outputs


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
    from app.predict import Predictor
    from app.scoring import score, score_file, write_reports

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
        from app.scoring import score

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
