"""Resource tiers and the plan: which settings this machine gets, and why.

Two steps, because the sequence length depends on the data:
1. ``apply_tier`` picks a tier from RAM (CPU) or VRAM (GPU) and takes its quant level,
   sample count, batch and accumulation for every variable the user did not set.
2. ``fit_memory`` sets MAX_SEQ_LEN from the data's own token lengths (the tier table's
   32/64 tokens would truncate most real samples), then shrinks batch (keeping the
   effective batch), turns on gradient checkpointing, or quantizes further until the
   estimator's predicted peak fits MEMORY_SAFETY x available memory.
Variables set explicitly (CLI, environment, .env) are never changed; TIER=none keeps the defaults.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from app.config import Config, Setting
from app.plan.estimator import Estimate, ModelShape
from app.plan.peak import predict_peak
from app.plan.precision import quant_needed
from app.plan.resources import Resources
from app.plan.stages import min_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tier:
    name: str
    quant: str
    seq: int  # the original table's length: only used when there is no data to measure
    samples: int
    batch: int
    grad_accum: int
    lora_r: int | None = None  # GPU tiers raise the rank with the memory


# (upper bound in GB, tier). CPU tiers by RAM, GPU tiers by VRAM, as the original tool had them.
CPU_TIERS = [
    (6, Tier("cpu-xs", "4bit", 32, 30, 1, 32)),
    (12, Tier("cpu-s", "4bit", 64, 200, 1, 16)),
    (24, Tier("cpu-m", "8bit", 128, 800, 2, 8)),
    (math.inf, Tier("cpu-l", "none", 256, 2000, 4, 4)),
]
GPU_TIERS = [
    (12, Tier("gpu-s", "4bit", 512, 2000, 2, 8, 8)),
    (24, Tier("gpu-m", "8bit", 1024, 5000, 4, 4, 16)),
    (math.inf, Tier("gpu-l", "none", 2048, 10000, 8, 2, 32)),
]
TIERS = {t.name: t for _, t in CPU_TIERS + GPU_TIERS}
_ESCALATE = {"none": "8bit", "8bit": "4bit"}
SEQ_QUANTILE = 0.95  # keep 95% of samples whole; the rest lose part of the prompt, never the answer


@dataclass(frozen=True)
class Plan:
    """What this run uses and why: the user's Config with each decision applied, never changed in
    place. Each step (tier, memory fit, guard, back-off) returns a new Plan (``dataclasses.replace``)."""

    tier: str = "none"
    device: str = "cpu"
    budget_mb: float = 0.0
    decisions: Mapping[Setting, tuple[Any, str]] = field(default_factory=lambda: MappingProxyType({}))
    estimate: Estimate | None = None
    warnings: tuple[str, ...] = ()
    held: Mapping[Setting, str] = field(default_factory=lambda: MappingProxyType({}))  # fixed before planning, and why
    cfg: Config = field(default_factory=Config)  # the settings as planned: the user's, with each decision

    def decide(self, var: Setting, value: Any, why: str) -> Plan:
        """``var`` = ``value`` unless the user set it; the value and the reason are recorded either way."""
        if var in self.cfg.explicit:
            return self.record(var, self.cfg.get(var), self.held.get(var, "set by you"))
        return self.set(var, value, why)

    def set(self, var: Setting, value: Any, why: str) -> Plan:
        """``var`` is ``value``, whoever set it (QUANT_LEVEL=auto resolves even when given)."""
        cfg = self.cfg.replace({var: value})
        return replace(self, cfg=cfg).record(var, cfg.get(var), why)

    def record(self, var: Setting, value: Any, why: str) -> Plan:
        """Note a setting's value and reason without changing it."""
        return replace(self, decisions=MappingProxyType({**self.decisions, var: (value, why)}))

    def warn(self, text: str) -> Plan:
        return replace(self, warnings=(*self.warnings, text))


def halve_batch(batch: int, accum: int) -> tuple[int, int]:
    """Half the micro-batch (BATCH_SIZE), and the GRAD_ACCUM that keeps the effective batch: the one
    back-off the tier fit, the guard's pre-flight and its runtime back-off all use."""
    half = max(1, batch // 2)
    return half, max(1, batch * accum // half)


def memory_gb(res: Resources) -> tuple[str, float]:
    if res.gpus:
        return "cuda", res.gpus[0].total_mb / 1024
    return "cpu", res.ram_total_mb / 1024


def apply_tier(cfg: Config, res: Resources, held: Mapping[Setting, str] | None = None) -> Plan:
    """Step 1: tier defaults for quant, samples, batch, accumulation (and GPU LoRA rank), planned
    on ``cfg`` (which stays as it is): the result is the Plan's cfg. ``held``: settings fixed
    before planning (a resumed run's), with the reason shown for them."""
    device, gb = memory_gb(res)
    plan = Plan(device=device, cfg=cfg, held=MappingProxyType(dict(held or {})))
    r = cfg.resources
    if r.tier == "none":
        return _quant_level(plan, "none", "TIER=none", "TIER=none")
    if r.tier != "auto":
        tier, why = TIERS[r.tier], f"TIER={r.tier}"
    else:
        table = GPU_TIERS if device == "cuda" else CPU_TIERS
        tier = next(t for bound, t in table if gb < bound)
        why = f"{'VRAM' if device == 'cuda' else 'RAM'} {gb:.1f} GB -> tier {tier.name}"
    plan = _quant_level(replace(plan, tier=tier.name), tier.quant, why, f"tier {tier.name}")
    plan = (
        plan.decide("MAX_SAMPLES", tier.samples, why)
        .decide("BATCH_SIZE", tier.batch, why)
        .decide("GRAD_ACCUM", tier.grad_accum, why)
    )
    if plan.cfg.train.batch_size < min_batch(plan.cfg) and "BATCH_SIZE" not in cfg.explicit:
        kto = "STAGE=kto pairs each answer with another of its micro-batch (its KL term)"
        plan = plan.decide("BATCH_SIZE", min_batch(plan.cfg), kto).decide(
            "GRAD_ACCUM", max(1, plan.cfg.train.grad_accum // 2), "keeps the effective batch"
        )
    if tier.lora_r:
        plan = plan.decide("LORA_R", tier.lora_r, why).decide("LORA_ALPHA", 2 * tier.lora_r, "2 x LORA_R")
    if "MAX_SEQ_LEN" not in cfg.explicit:  # replaced by the data's lengths in fit_memory
        plan = plan.set("MAX_SEQ_LEN", tier.seq, f"{why} (no data measured)")
    return plan


def _quant_level(plan: Plan, default: str, why: str, source: str) -> Plan:
    """QUANT_LEVEL: yours (Config.validate checked it against the other settings); else the one format a
    setting needs (app.plan.precision.quant_needed), said in one line where ``source`` (the tier) would have
    picked another; else ``default``, the tier's. Set even when given: QUANT_LEVEL=auto resolves here."""
    given, need = plan.cfg.resources.quant_level, quant_needed(plan.cfg)
    if given != "auto":
        return plan.set("QUANT_LEVEL", given, plan.held.get("QUANT_LEVEL", "set by you"))
    if need is None:
        return plan.set("QUANT_LEVEL", default, why)
    level, setting, because, instead = need
    if level != default:
        log.info(
            "QUANT_LEVEL=%s instead of %s's %s: %s %s; %s keeps %s",
            level,
            source,
            default,
            setting,
            because,
            instead,
            default,
        )
    return plan.set("QUANT_LEVEL", level, setting)


def seq_from_lengths(lengths: list[int], max_positions: int) -> int:
    ordered = sorted(lengths)
    q = ordered[min(len(ordered) - 1, int(SEQ_QUANTILE * len(ordered)))]
    return max(16, min(max_positions, -(-q // 16) * 16))


def fit_memory(plan: Plan, res: Resources, shape: ModelShape, lengths: list[int] | None) -> Plan:
    """Step 2: sequence length from the data, then shrink until the predicted peak fits."""
    cuda = plan.device == "cuda"
    available = res.gpus[0].free_mb if cuda else res.ram_available_mb
    plan = replace(plan, budget_mb=available * plan.cfg.resources.memory_safety)
    if lengths and plan.tier != "none":
        plan = plan.decide(
            "MAX_SEQ_LEN",
            seq_from_lengths(lengths, shape.max_positions),
            f"{int(SEQ_QUANTILE * 100)}% of the {len(lengths)} samples fit whole (longest {max(lengths)} tokens)",
        )
    if plan.cfg.resources.gradient_checkpointing == "auto":  # on only if needed, below
        plan = replace(plan, cfg=plan.cfg.replace({"GRADIENT_CHECKPOINTING": "off"}))
    while plan.tier != "none" and predict_peak(plan.cfg, shape, cuda).total_mb > plan.budget_mb:
        shrunk = _shrink(plan)
        if shrunk is None:
            break
        plan = shrunk
    if "GRADIENT_CHECKPOINTING" not in plan.decisions:
        plan = plan.record("GRADIENT_CHECKPOINTING", plan.cfg.resources.gradient_checkpointing, "not needed to fit")
    peak = predict_peak(plan.cfg, shape, cuda)
    plan = replace(plan, estimate=peak)
    _refuse_unloadable(plan, peak, res, available)
    if peak.total_mb > plan.budget_mb:
        levers = " or ".join(
            x
            for x in (
                _smaller_quant(plan.cfg),
                _can_checkpoint(plan.cfg)
                and plan.cfg.resources.gradient_checkpointing != "on"
                and "GRADIENT_CHECKPOINTING=on",
            )
            if x
        )
        plan = plan.warn(
            f"predicted peak {peak.total_mb:,.0f} MB exceeds the budget {plan.budget_mb:,.0f} MB "
            f"({plan.cfg.resources.memory_safety:.0%} of {available:,.0f} MB available): lower MAX_SEQ_LEN or "
            f"BATCH_SIZE{', use ' + levers if levers else ''}; the memory guard will back off"
        )
    return plan


def _refuse_unloadable(plan: Plan, e: Estimate, res: Resources, available: float) -> None:
    """One line and no load when the part of the peak nothing can shrink (the runtime, the weights, the
    trainable weights and their optimizer state, a quantized layer's dequantized copies) is over all the memory
    there is: loading would only be killed minutes later (a 9B 4-bit model in 8 GB: 8,101 of its 8,246 MB at
    MAX_SEQ_LEN 64, 7,693 MB available). MEMORY_GUARD=off loads anyway; ZeRO places the weights itself."""
    from app.core.errors import UserError

    cfg = plan.cfg
    fixed = e.runtime_mb + e.weights_mb + e.trainable_mb + e.transient_mb
    if fixed <= available or cfg.resources.memory_guard == "off" or cfg.distributed.ds_config:
        return
    quant = cfg.resources.quant_level
    where = "free on the GPU" if plan.device == "cuda" else f"available ({res.limit_source})"
    smaller = f" or {_smaller_quant(cfg)}" if _smaller_quant(cfg) else ""
    raise UserError(
        f"MODEL_NAME={cfg.model.model_name} does not fit: its weights at QUANT_LEVEL={quant}, "
        f"the trainable part and the runtime alone are predicted at {fixed:,.0f} MB at any length, and "
        f"{available:,.0f} MB is {where}, so loading would be killed; use a smaller model{smaller}, "
        "more memory, or MEMORY_GUARD=off to load anyway"
    )


def _can_checkpoint(cfg: Config) -> bool:
    return cfg.lora.method != "ptuning"  # PEFT runs no prefix (a key/value cache) through checkpointed layers


def _smaller_quant(cfg: Config) -> str:
    """QUANT_LEVEL=4bit as a remedy, where it is not already 4bit and no other setting needs the format it has."""
    return "QUANT_LEVEL=4bit" if cfg.resources.quant_level != "4bit" and quant_needed(cfg) is None else ""


def _shrink(plan: Plan) -> Plan | None:
    """The next step down in memory among the settings the user left to the plan; None when none is left. A
    weight format another setting needs (app.plan.precision.quant_needed) is kept."""
    cfg = plan.cfg
    t, r = cfg.train, cfg.resources
    if t.batch_size > min_batch(cfg) and "BATCH_SIZE" not in cfg.explicit:
        batch, accum = halve_batch(t.batch_size, t.grad_accum)
        plan = plan.decide("BATCH_SIZE", batch, "halved to fit memory")
        return plan if "GRAD_ACCUM" in cfg.explicit else plan.decide("GRAD_ACCUM", accum, "keeps the effective batch")
    if r.gradient_checkpointing == "off" and "GRADIENT_CHECKPOINTING" not in cfg.explicit and _can_checkpoint(cfg):
        return plan.decide("GRADIENT_CHECKPOINTING", "on", "needed to fit memory")
    if r.quant_level in _ESCALATE and "QUANT_LEVEL" not in cfg.explicit and quant_needed(cfg) is None:
        return plan.decide("QUANT_LEVEL", _ESCALATE[r.quant_level], "needed to fit memory")
    if cfg.data.max_seq_len > 64 and "MAX_SEQ_LEN" not in cfg.explicit:
        return plan.decide(
            "MAX_SEQ_LEN",
            max(64, cfg.data.max_seq_len * 3 // 4 // 16 * 16),
            "shortened to fit memory (longer samples lose part of the prompt)",
        )
    return None
