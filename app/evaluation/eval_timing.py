"""Predict how long `make evaluate` takes before any weight loads: `make info` prints it, evaluate logs it.

Evaluate answers its records PREDICT_BATCH_SIZE at a time (app/inference/generate.py: prompts of similar
length together), then takes the reference answers' loss in one teacher-forced pass. So, for the engine
predict would load (INFER_BACKEND, QUANT_LEVEL or GGUF_QUANT):

    startup + load + sum over batches (prefill + decode steps) + the loss pass

- a decode step reads every weight once and computes each row it decodes:
  ``weight bytes / (bandwidth x B) + rows x F / (dense x R)``, F = 2 FLOPs per weight a token passes;
  torch decodes a batch's finished rows too until its longest is done, llama.cpp only the live ones;
- prefill (torch: the batch padded to its longest prompt; llama.cpp: each prompt) and the loss pass run every
  token at ``dense x P``;
- bandwidth and dense are what this machine shows a moment before (app/plan/probes.py: a sum over a buffer
  no cache holds, an fp32 projection of the model's shape); B, R and P are each engine's shares of them,
  measured by `make bench-infer` at the 1.5B shape (bench/infer.md), which also checks the 6B shape.

Two figures: answers as long as the references (a trained model stops there) and every answer at evaluate's
budget (an untrained or random model runs on: the upper bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.inference.gguf_source import BYTES_PER_WEIGHT
from app.plan.estimator import QUANT_BYTES, ModelShape
from app.plan.train_timing import duration

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from app.data.records import Example

STARTUP_S = 6.0  # importing torch and transformers, the tokenizer, the reports: an evaluate process's fixed cost


@dataclass(frozen=True)
class Engine:
    """An engine's shares of the probes' rates (bench/infer.md), and its load time per 1e9 weights."""

    bandwidth: float  # B: weight bytes a decode step reads / the probed bandwidth
    row: float  # R: a decoded row's FLOP/s / the probed dense FLOP/s
    prefill: float  # P: prefill's and the loss pass's FLOP/s / the probed dense FLOP/s
    load_s: float  # seconds per 1e9 weights to load (torch k-bit: quantizing as it loads)
    step_s: float  # fixed seconds per decode step (Python, sampling): what dominates a tiny model


# Fitted by `make bench-infer` (bench/infer.md, "engine shares") to the 1.5B shape's decode steps of 1 and 8 rows,
# its prefill and its load, with that machine's probes (27 GB/s, 306 GFLOP/s); step_s from the demo's 0.9M model.
# A share above 1 is a fitted coefficient, not a rate: torch fp32 decodes one row faster than the probe's sum reads.
ENGINES = {
    "torch none": Engine(bandwidth=1.39, row=0.18, prefill=0.91, load_s=1.7, step_s=0.002),
    "torch 8bit": Engine(bandwidth=0.43, row=1.78, prefill=2.09, load_s=7.1, step_s=0.002),
    "torch 4bit": Engine(bandwidth=0.74, row=0.44, prefill=0.46, load_s=19.5, step_s=0.002),
    "llama.cpp f16": Engine(bandwidth=0.80, row=0.75, prefill=0.57, load_s=0.06, step_s=0.0003),
    "llama.cpp q8_0": Engine(bandwidth=0.75, row=0.48, prefill=0.51, load_s=0.06, step_s=0.0003),
    "llama.cpp k-quant": Engine(bandwidth=0.69, row=0.55, prefill=0.94, load_s=0.69, step_s=0.0003),
}


@dataclass(frozen=True)
class EvalTime:
    """The estimate for ``samples`` records on ``engine``; ``unknown``: why there is none."""

    samples: int
    engine: str
    seconds: float = 0.0  # answers as long as the references
    budget_seconds: float = 0.0  # every answer at the budget
    budget: int = 0
    unknown: str = ""

    def line(self) -> str:
        if self.unknown:
            return f"expected evaluate: unknown ({self.unknown})"
        return (
            f"expected evaluate: ~{duration(self.seconds)} for {self.samples} records on {self.engine} "
            f"(answers as long as the references; ~{duration(self.budget_seconds)} if every answer runs to "
            f"its {self.budget}-token budget, as an untrained model's do)"
        )


def engine_key(backend: str, quant: str) -> str:
    """'torch 4bit', 'llama.cpp q8_0', 'llama.cpp k-quant' ... (quant: QUANT_LEVEL, or GGUF_QUANT for llama.cpp)."""
    if backend == "torch":
        return f"torch {quant if quant in ('4bit', '8bit') else 'none'}"
    if quant in ("f16", "bf16"):
        return "llama.cpp f16"
    return "llama.cpp q8_0" if quant == "q8_0" else "llama.cpp k-quant"


def weight_bytes(shape: ModelShape, backend: str, quant: str, gguf_bytes: int | None = None) -> float:
    """What a decode step reads: the GGUF file (its size where it exists), else the loaded weights as predict keeps
    them (k-bit projections with bf16 embeddings and head; QUANT_LEVEL=none loads fp32)."""
    if backend == "llama.cpp":
        return float(gguf_bytes) if gguf_bytes else shape.total_params * BYTES_PER_WEIGHT.get(quant, 2.0)
    if quant in QUANT_BYTES:
        return shape.linear_params * QUANT_BYTES[quant] + shape.other_params * 2
    return shape.total_params * 4.0


def estimate(
    shape: ModelShape,
    backend: str,
    quant: str,
    prompts: Sequence[int],
    answers: Sequence[int],
    budget: int,
    batch_size: int,
    rates: tuple[float, float],
    gguf_bytes: int | None = None,
    load: bool = True,
) -> EvalTime:
    """``prompts``/``answers``: each record's token counts; ``rates``: (bytes/s, dense FLOP/s) the probes measured.
    ``load``: count loading the model (evaluate logs its estimate after the load, info before it)."""
    key = engine_key(backend, quant)
    e, (bandwidth, dense) = ENGINES[key], rates
    name = f"{backend} {quant}" if backend == "llama.cpp" else f"torch {quant if quant != 'none' else 'fp32'}"
    flops = 2.0 * (shape.linear_params + shape.hidden * shape.vocab)  # per token: the blocks and the head
    step = weight_bytes(shape, backend, quant, gguf_bytes) / (bandwidth * e.bandwidth) + e.step_s
    row, token = flops / (dense * e.row), flops / (dense * e.prefill)
    fixed = STARTUP_S + (e.load_s * shape.total_params / 1e9 if load else 0.0)
    loss = sum(p + a + 1 for p, a in zip(prompts, answers, strict=True)) * token
    both = []
    for lengths in ([min(a + 1, budget) for a in answers], [budget] * len(answers)):
        total = fixed + loss
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i], i))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            steps = max(lengths[i] for i in batch)
            if backend == "llama.cpp":  # each prompt alone; finished rows leave the batch
                total += sum(prompts[i] for i in batch) * token + steps * step + sum(lengths[i] for i in batch) * row
            else:  # padded to the longest prompt; every row runs until the batch's longest answer is done
                total += len(batch) * (max(prompts[i] for i in batch) * token + steps * row) + steps * step
        both.append(total)
    return EvalTime(len(prompts), name, both[0], both[1], budget)


def token_counts(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> tuple[list[int], list[int]]:
    """(prompt tokens as predict renders them, answer tokens) of each record."""
    from app.data.encode import prompt_text

    prompts = [
        len(tokenizer(prompt_text(tokenizer, e.prompt_messages), add_special_tokens=False)["input_ids"])
        for e in examples
    ]
    answers = [len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples]
    return prompts, answers


def probe_rates(shape: ModelShape) -> tuple[float, float]:
    """(bytes/s, fp32 FLOP/s of a projection of the model's shape); NothingMeasured on a busy machine."""
    from app.plan.probes import PROBE_TOKENS, probe_bandwidth, probe_linear

    return probe_bandwidth(), probe_linear("none", "fp32", shape.hidden, shape.intermediate, PROBE_TOKENS)


def unknown(samples: int, why: str) -> EvalTime:
    return EvalTime(samples, "", unknown=why)


def expected_evaluate(
    shape: ModelShape,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    backend: str,
    quant: str,
    batch_size: int,
    gguf_bytes: int | None = None,
    load: bool = True,
) -> EvalTime:
    """``estimate`` for ``examples`` (app.evaluation.dataset's records) with this machine's probes; unknown on a
    busy machine, whose probes time other processes."""
    from app.inference.generate import max_new_tokens_for
    from app.plan.probes import NothingMeasured

    if not examples:
        return unknown(0, "no records to score")
    try:
        rates = probe_rates(shape)
    except NothingMeasured as e:
        return unknown(len(examples), f"the probe measured nothing: {e}")
    prompts, answers = token_counts(tokenizer, examples)
    budget = max_new_tokens_for(tokenizer, [e.answer for e in examples])
    return estimate(shape, backend, quant, prompts, answers, budget, batch_size, rates, gguf_bytes, load)
