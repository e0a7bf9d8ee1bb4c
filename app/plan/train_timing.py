"""Predict how long training takes, before any weight is loaded: per optimizer step and for the run.

A FLOPs model of one micro-batch (``micro_batch_flops``: the blocks' projections, attention, the LM head,
LoRA; backward and gradient checkpointing from the method), each kind divided by the rate this machine
showed a moment before in the run's own compute setting (app/plan/probes.py: a 4-bit / 8-bit layer's
dequantization included), plus one block's elementwise work per token and layer (norms, activation,
residual adds, dropout) and the optimizer's step, both measured too. An estimate of the training loop
only: loading, the token cache, evaluation and checkpoint saves come on top. A probe that measured nothing
(a busy machine: app/plan/probes.py) gives no time at all, never a number built on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from app.config import Config
from app.plan.estimator import ModelShape
from app.plan.peak import trainable_params
from app.plan.precision import bf16_frozen_weights, resolve_precision
from app.plan.probes import NothingMeasured, probe_attention, probe_glue, probe_linear, probe_lora, probe_optimizer
from app.plan.stages import stage_cost

LENGTH_SAMPLE = 2000  # rows read for the lengths of a micro-batch


@dataclass(frozen=True)
class Flops:
    """One micro-batch's forward FLOPs by kind; backward and the checkpointing recompute follow from the method."""

    linear: float  # the blocks' projections: 2 x linear_params x tokens
    attention: float  # scores and weighted values: 4 x layers x batch x seq^2 x hidden
    head: float  # the LM head: 2 x hidden x vocab x (tokens whose logits are computed)
    adapter: float  # LoRA's A and B: 2 x r x lora_io x tokens (its time is probe_lora's, not its FLOPs')
    full: bool  # METHOD=full: weight gradients for the projections and the head too
    checkpointing: bool  # the blocks' forward runs again in backward

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.head + self.adapter

    @property
    def backward(self) -> float:
        """Input gradients (1x a matmul's forward, 2x for attention's two products) and the trainable weights'
        gradients (1x more): frozen projections need only the former, LoRA's and full tuning's both."""
        weights = 2 if self.full else 1
        return weights * (self.linear + self.head) + 2 * self.attention + 2 * self.adapter

    @property
    def recompute(self) -> float:
        return self.forward - self.head if self.checkpointing else 0.0

    def by_kind(self) -> dict[str, float]:
        """Forward + backward + recompute FLOPs of each kind (each runs at its own measured rate)."""
        w, c = (2 if self.full else 1), (1 if self.checkpointing else 0)
        return {
            "linear": self.linear * (1 + w + c),
            "attention": self.attention * (3 + c),
            "head": self.head * (1 + w),
            "adapter": self.adapter * (3 + c),
        }

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def micro_batch_flops(
    shape: ModelShape,
    batch: int,
    seq: float,
    method: str = "lora",
    grad_ckpt: bool = False,
    lora_r: int = 0,
    head_share: float = 1.0,
) -> Flops:
    """``seq``: tokens per sample; ``head_share``: the share of tokens whose logits are computed."""
    tokens = batch * seq
    adapter = 2 * lora_r * shape.lora_io * tokens if method in ("lora", "qlora") else 0.0
    return Flops(
        linear=2 * shape.linear_params * tokens,
        attention=4 * shape.layers * batch * seq**2 * shape.hidden,
        head=2 * shape.hidden * shape.vocab * tokens * head_share,
        adapter=adapter,
        full=method == "full",
        checkpointing=grad_ckpt,
    )


@dataclass(frozen=True)
class StepTime:
    """The estimate: seconds per micro-batch, per optimizer step (x GRAD_ACCUM, plus the optimizer) and for the
    run's ``steps``; ``gflops``: the projection probe's rate, in ``setting`` (compute dtype and quant level).
    ``unknown``: why a probe measured nothing; then there is no estimate, and the numbers are not one."""

    micro_batch_s: float
    step_s: float
    total_s: float
    steps: int
    gflops: float
    setting: str
    tokens_per_step: float = 0.0  # the tokens an optimizer step was assumed to see (the data's mean when packed)
    head_share: float = 1.0  # the share of them whose logits were assumed computed
    unknown: str = ""

    def line(self) -> str:
        if self.unknown:
            return f"expected time: unknown for {self.steps} steps: the probe measured nothing ({self.unknown})"
        return (
            f"expected ~{duration(self.step_s)} per optimizer step, ~{duration(self.total_s)} for {self.steps} "
            f"steps (FLOPs model, probe {_rate(self.gflops)} GFLOP/s {self.setting})"
        )

    def summary(self, steps_run: int, seconds: float) -> dict[str, Any]:
        """summary.json's fields: the prediction next to the measured seconds per optimizer step (None: none)."""
        known = self._known
        return {
            "predicted_step_s": known(self.step_s, 3),
            "predicted_total_s": known(self.total_s, 3),
            "predicted_steps": self.steps,
            "probe_gflops": known(self.gflops, 1),
            "predicted_tokens_per_step": known(self.tokens_per_step, 1),
            "predicted_head_share": known(self.head_share, 4),
            "measured_step_s": round(seconds / steps_run, 3) if steps_run > 0 else None,
        }

    def _known(self, value: float, digits: int) -> float | None:
        return None if self.unknown else round(value, digits)


def _rate(gflops: float) -> str:
    """'351', '12', '0.71': a slow probe (a tiny model's layer, a quantized one on a small CPU) is not '0'."""
    return f"{gflops:,.0f}" if gflops >= 9.5 else f"{gflops:.2g}"


def duration(seconds: float) -> str:
    """'0.42 s', '12 s', '2.1 min', '35 min', '3.5 h', '2.0 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 1.5 * size:
            value = seconds / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


def optimizer_steps(cfg: Config, train_samples: int, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps, micro-batches per rank) as the HF Trainer counts them: MAX_STEPS, else NUM_EPOCHS over
    ceil(samples / (BATCH_SIZE x ranks)) micro-batches, GRAD_ACCUM of them (the last of an epoch fewer) a step."""
    t = cfg.train
    per_epoch = max(1, math.ceil(math.ceil(train_samples / world_size) / t.batch_size))
    steps_per_epoch = max(1, math.ceil(per_epoch / t.grad_accum))
    if t.max_steps > 0:
        return t.max_steps, t.max_steps * t.grad_accum
    steps = math.ceil(t.num_epochs * steps_per_epoch)
    return steps, min(steps * t.grad_accum, math.ceil(t.num_epochs * per_epoch))


def predict_step_time(
    cfg: Config,
    shape: ModelShape,
    train_samples: int,
    seq: float | None = None,
    head_share: float = 1.0,
    cuda: bool = False,
    world_size: int = 1,
) -> StepTime:
    """The estimate for cfg's planned settings on ``train_samples`` training rows. ``seq``: tokens per sample
    in a micro-batch (the mean when packed, the longest of a micro-batch when padded; MAX_SEQ_LEN if None);
    ``head_share``: the share of tokens whose logits are computed (packed rows skip prompt positions)."""
    from app.core.errors import UserError

    t, r, method = cfg.train, cfg.resources, cfg.lora.method
    try:
        precision = resolve_precision(cfg, cuda)
    except UserError:  # an impossible PRECISION is reported by training itself
        precision = "fp32"
    quant = r.quant_level if r.quant_level in ("4bit", "8bit") else "none"
    seq = float(min(seq or cfg.data.max_seq_len, cfg.data.max_seq_len))
    cost = stage_cost(cfg)  # a DPO pair: two sequences in the micro-batch, and the reference's forward passes
    rows = t.batch_size * cost.sequences
    tokens = max(1, round(rows * seq))
    flops = micro_batch_flops(shape, rows, seq, method, r.gradient_checkpointing == "on", cfg.lora.lora_r, head_share)
    steps, micro_batches = optimizer_steps(cfg, train_samples, world_size)
    step_time = partial(
        StepTime,
        steps=steps,
        setting=_setting(quant, precision, cuda),
        tokens_per_step=rows * seq * t.grad_accum,
        head_share=head_share,
    )
    full, half = method == "full", bf16_frozen_weights(cfg, precision, cuda)  # half: dense frozen weights in bf16
    try:
        rate = probe_linear(quant, precision, shape.hidden, shape.intermediate, tokens, full, half, cuda)
        dense = (
            rate
            if quant == "none"
            else probe_linear("none", precision, shape.hidden, shape.vocab, tokens, full, half, cuda)
        )  # a quantized run's head
        attn = probe_attention(precision, max(8, shape.hidden // max(1, shape.heads)), seq, cuda)
        # per token: a block's elementwise work (a bf16 residual stream only where every dense weight is bf16), and
        # LoRA's adapter paths per unit of their targets' in + out features
        glue = probe_glue(shape.hidden, shape.intermediate, tokens, half and quant == "none", cuda) * tokens
        lora = (
            probe_lora(precision, shape.hidden, cfg.lora.lora_r, tokens, cuda) * tokens * shape.lora_io
            if method in ("lora", "qlora")
            else 0.0
        )
        optim = trainable_params(cfg, shape) * probe_optimizer(trainable_params(cfg, shape), cuda)
    except NothingMeasured as e:  # no number at all: one built on it would read as a prediction
        return step_time(0.0, 0.0, 0.0, gflops=0.0, unknown=str(e))
    work, recompute = flops.by_kind(), 4 / 3 if flops.checkpointing else 1  # a recompute: the forward's third
    micro = (
        work["linear"] / rate
        + work["head"] / dense
        + work["attention"] / attn
        + (glue * shape.layers + lora) * recompute
    )
    if cost.no_grad_passes:  # forward only, adapter off: the projections, head and attention, and a third of the glue
        ref = micro_batch_flops(shape, t.batch_size * cost.no_grad_passes, seq, "full", False, 0, head_share)
        micro += (
            ref.linear / rate
            + ref.head / dense
            + ref.attention / attn
            + glue * shape.layers * cost.no_grad_passes / cost.sequences / 3
        )
    return step_time(micro, micro * t.grad_accum + optim, micro * micro_batches + optim * steps, gflops=rate / 1e9)


def _setting(quant: str, precision: str, cuda: bool) -> str:
    if quant == "4bit":  # the 4-bit layers compute in their own dtype
        from app.models.quantization import compute_dtype

        precision = compute_dtype(cuda)
    return precision if quant == "none" else f"{precision} {quant}"


def batch_shape(rows: Sequence[dict], batch: int, packed: bool) -> tuple[float | None, float]:
    """(tokens per sample in a micro-batch, share of tokens whose logits are computed), from up to
    LENGTH_SAMPLE of the training rows: packed rows cost their mean length and compute logits only where a
    label follows; padded rows cost the longest of ``batch`` random rows, every position's logits."""
    step = max(1, len(rows) // LENGTH_SAMPLE)
    sample = [rows[i] for i in range(0, len(rows), step)]
    lengths = sorted(row_length(r) for r in sample)
    if not lengths:
        return None, 1.0
    if packed:
        labelled = sum(sum(1 for x in r["labels"] if x != -100) for r in sample)
        return sum(lengths) / len(lengths), min(1.0, max(labelled, 1) / sum(lengths))
    m = len(lengths)  # E[max of `batch` draws] = sum of l_(i) x P(the max is the i-th smallest)
    return sum(n * (((i + 1) / m) ** batch - (i / m) ** batch) for i, n in enumerate(lengths)), 1.0


def row_length(row: dict) -> int:
    """A row's tokens in a padded micro-batch: an SFT row's, or a preference row's prompt and longer answer."""
    if "input_ids" in row:
        return len(row["input_ids"])
    answers = [len(row[k]) for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in row]
    return len(row["prompt_ids"]) + max(answers, default=0)


def expected_time(
    cfg: Config,
    shape: ModelShape,
    model_path: str,
    rows: Sequence[dict] | None,
    cuda: bool = False,
    world_size: int = 1,
    train_samples: int | None = None,
) -> StepTime:
    """predict_step_time for a planned run, its lengths from the training ``rows`` (None: no data yet, every
    sample MAX_SEQ_LEN long), packed or padded as training will batch them; ``train_samples`` (default: as many
    as the rows) counts the steps."""
    from transformers import AutoConfig

    from app.core.errors import UserError
    from app.plan.precision import packing_choice

    seq, head_share = None, 1.0
    if rows:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
        try:
            packed = packing_choice(cfg, getattr(config, "model_type", None))[0]
        except UserError:  # PACKING=on where it cannot work: training says so
            packed = False
        seq, head_share = batch_shape(rows, cfg.train.batch_size, packed)
    n = train_samples if train_samples is not None else len(rows or ())
    return predict_step_time(cfg, shape, n, seq, head_share, cuda, world_size)
