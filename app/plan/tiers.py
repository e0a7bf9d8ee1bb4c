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
from dataclasses import dataclass, field
from typing import Any

from app.config import Config, documented
from app.plan.estimator import Estimate, ModelShape, estimate
from app.plan.resources import Resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tier:
    name: str
    quant: str
    seq: int        # the original table's length: only used when there is no data to measure
    samples: int
    batch: int
    grad_accum: int
    lora_r: int | None = None  # GPU tiers raise the rank with the memory


# (upper bound in GB, tier). CPU tiers by RAM, GPU tiers by VRAM, as the original tool had them.
CPU_TIERS = [(6, Tier("cpu-xs", "4bit", 32, 30, 1, 32)), (12, Tier("cpu-s", "4bit", 64, 200, 1, 16)),
             (24, Tier("cpu-m", "8bit", 128, 800, 2, 8)), (math.inf, Tier("cpu-l", "none", 256, 2000, 4, 4))]
GPU_TIERS = [(12, Tier("gpu-s", "4bit", 512, 2000, 2, 8, 8)), (24, Tier("gpu-m", "8bit", 1024, 5000, 4, 4, 16)),
             (math.inf, Tier("gpu-l", "none", 2048, 10000, 8, 2, 32))]
TIERS = {t.name: t for _, t in CPU_TIERS + GPU_TIERS}
_ESCALATE = {"none": "8bit", "8bit": "4bit"}
SEQ_QUANTILE = 0.95  # keep 95% of samples whole; the rest lose part of the prompt, never the answer


@dataclass
class Plan:
    tier: str = "none"
    device: str = "cpu"
    budget_mb: float = 0.0
    decisions: dict[str, tuple[Any, str]] = field(default_factory=dict)
    estimate: Estimate | None = None
    warnings: list[str] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)  # settings fixed before planning, and why (a resume)
    cfg: Config = field(default_factory=Config)  # the settings as planned: the user's, with each decision

    def decide(self, var: str, value: Any, why: str) -> None:
        """Set ``var`` unless the user did; record the value and the reason either way."""
        if var in self.cfg.explicit:
            self.decisions[var] = (self.cfg.get(var), self.held.get(var, "set by you"))
        else:
            self.set(var, value, why)

    def set(self, var: str, value: Any, why: str) -> None:
        """``var`` is ``value``, whoever set it (QUANT_LEVEL=auto resolves even when given): a new
        planned Config, the user's is never changed."""
        self.cfg = self.cfg.replace({var: value})
        self.decisions[var] = (self.cfg.get(var), why)


def halve_batch(batch: int, accum: int) -> tuple[int, int]:
    """Half the micro-batch (BATCH_SIZE), and the GRAD_ACCUM that keeps the effective batch: the one
    back-off the tier fit, the guard's pre-flight and its runtime back-off all use."""
    half = max(1, batch // 2)
    return half, max(1, batch * accum // half)


def memory_gb(res: Resources) -> tuple[str, float]:
    if res.gpus:
        return "cuda", res.gpus[0].total_mb / 1024
    return "cpu", res.ram_total_mb / 1024


def apply_tier(cfg: Config, res: Resources, plan: Plan | None = None) -> Plan:
    """Step 1: tier defaults for quant, samples, batch, accumulation (and GPU LoRA rank), planned
    on ``cfg`` (which stays as it is): the result is ``plan.cfg``."""
    plan = plan or Plan()
    plan.cfg = cfg
    plan.device, gb = memory_gb(res)
    if cfg.resources.tier == "none":
        plan.tier = "none"
        quant = {"qlora": "4bit", "full": "none"}.get(cfg.lora.method, cfg.resources.quant_level)
        level = "none" if quant == "auto" else quant  # "auto" resolves even when given explicitly
        plan.set("QUANT_LEVEL", level, "TIER=none" if quant == "auto" else plan.held.get("QUANT_LEVEL", "set by you"))
        return plan
    if cfg.resources.tier != "auto":
        tier, why = TIERS[cfg.resources.tier], f"TIER={cfg.resources.tier}"
    else:
        table = GPU_TIERS if plan.device == "cuda" else CPU_TIERS
        tier = next(t for bound, t in table if gb < bound)
        kind = "VRAM" if plan.device == "cuda" else "RAM"
        why = f"{kind} {gb:.1f} GB -> tier {tier.name}"
    plan.tier = tier.name
    if cfg.lora.method in ("qlora", "full"):
        plan.set("QUANT_LEVEL", "4bit" if cfg.lora.method == "qlora" else "none", f"METHOD={cfg.lora.method}")
    elif cfg.resources.quant_level != "auto":
        plan.decisions["QUANT_LEVEL"] = (cfg.resources.quant_level, plan.held.get("QUANT_LEVEL", "set by you"))
    elif cfg.train.precision == "bf16":  # bf16 autocast runs on unquantized weights
        plan.set("QUANT_LEVEL", "none", "PRECISION=bf16")
    else:
        plan.set("QUANT_LEVEL", tier.quant, why)
    plan.decide("MAX_SAMPLES", tier.samples, why)
    plan.decide("BATCH_SIZE", tier.batch, why)
    plan.decide("GRAD_ACCUM", tier.grad_accum, why)
    if tier.lora_r:
        plan.decide("LORA_R", tier.lora_r, why)
        plan.decide("LORA_ALPHA", 2 * tier.lora_r, "2 x LORA_R")
    if "MAX_SEQ_LEN" not in cfg.explicit:  # replaced by the data's lengths in fit_memory
        plan.set("MAX_SEQ_LEN", tier.seq, f"{why} (no data measured)")
    return plan


def seq_from_lengths(lengths: list[int], max_positions: int) -> int:
    ordered = sorted(lengths)
    q = ordered[min(len(ordered) - 1, int(SEQ_QUANTILE * len(ordered)))]
    return max(16, min(max_positions, -(-q // 16) * 16))


def fit_memory(plan: Plan, res: Resources, shape: ModelShape, lengths: list[int] | None) -> Plan:
    """Step 2, on ``plan.cfg``: sequence length from the data, then shrink until the predicted peak fits."""
    cuda = plan.device == "cuda"
    available = res.gpus[0].free_mb if cuda else res.ram_available_mb
    plan.budget_mb = available * plan.cfg.resources.memory_safety
    if lengths and plan.tier != "none":
        seq = seq_from_lengths(lengths, shape.max_positions)
        plan.decide("MAX_SEQ_LEN", seq, f"{int(SEQ_QUANTILE * 100)}% of the {len(lengths)} samples "
                                        f"fit whole (longest {max(lengths)} tokens)")

    def predicted() -> Estimate:
        return predict_peak(plan.cfg, shape, cuda)

    if plan.cfg.resources.gradient_checkpointing == "auto":  # on only if needed, below
        plan.cfg = plan.cfg.replace({"GRADIENT_CHECKPOINTING": "off"})
    while predicted().total_mb > plan.budget_mb and plan.tier != "none":
        cfg = plan.cfg
        t, r = cfg.train, cfg.resources
        if t.batch_size > 1 and "BATCH_SIZE" not in cfg.explicit:
            batch, accum = halve_batch(t.batch_size, t.grad_accum)
            plan.decide("BATCH_SIZE", batch, "halved to fit memory")
            if "GRAD_ACCUM" not in cfg.explicit:
                plan.decide("GRAD_ACCUM", accum, "keeps the effective batch")
        elif r.gradient_checkpointing == "off" and "GRADIENT_CHECKPOINTING" not in cfg.explicit:
            plan.decide("GRADIENT_CHECKPOINTING", "on", "needed to fit memory")
        elif (r.quant_level in _ESCALATE and "QUANT_LEVEL" not in cfg.explicit
              and cfg.lora.method in ("lora", "ptuning")):
            plan.decide("QUANT_LEVEL", _ESCALATE[r.quant_level], "needed to fit memory")
        elif cfg.data.max_seq_len > 64 and "MAX_SEQ_LEN" not in cfg.explicit:
            plan.decide("MAX_SEQ_LEN", max(64, cfg.data.max_seq_len * 3 // 4 // 16 * 16),
                        "shortened to fit memory (longer samples lose part of the prompt)")
        else:
            break
    plan.decisions.setdefault("GRADIENT_CHECKPOINTING",
                              (plan.cfg.resources.gradient_checkpointing, "not needed to fit"))
    plan.estimate = predicted()
    if plan.estimate.total_mb > plan.budget_mb:
        plan.warnings.append(
            f"predicted peak {plan.estimate.total_mb:,.0f} MB exceeds the budget {plan.budget_mb:,.0f} MB "
            f"({plan.cfg.resources.memory_safety:.0%} of {available:,.0f} MB available): lower MAX_SEQ_LEN or "
            "BATCH_SIZE, use QUANT_LEVEL=4bit or GRADIENT_CHECKPOINTING=on; the memory guard will back off")
    return plan


def predict_peak(cfg: Config, shape: ModelShape, cuda: bool) -> Estimate:
    """The estimator for cfg's current settings (full tuning trains and stores every weight)."""
    from app.core.errors import UserError
    from app.plan.precision import bf16_frozen_weights, resolve_precision

    try:
        half = bf16_frozen_weights(cfg, resolve_precision(cfg, cuda), cuda)
    except UserError:  # an impossible PRECISION is reported by training itself
        half = False
    return estimate(shape, cfg.resources.quant_level, cfg.lora.lora_r, cfg.train.batch_size, cfg.data.max_seq_len,
                    cfg.resources.gradient_checkpointing == "on", cuda, cfg.train.optim,
                    trainable_params=_trainable(cfg, shape), half_weights=half)


def _trainable(cfg: Config, shape: ModelShape) -> int | None:
    if cfg.lora.method == "full":
        return shape.total_params
    if cfg.lora.method == "ptuning":  # a key and a value prefix per layer (+ the optional MLP)
        prefix = cfg.lora.pre_seq_len * shape.layers * 2 * shape.hidden
        return prefix + (2 * shape.hidden * shape.hidden + shape.hidden * prefix // cfg.lora.pre_seq_len
                         if cfg.lora.prefix_projection else 0)
    return None  # LoRA: rank x targets


def format_info(res: Resources, plan: Plan, shape: ModelShape | None, model_name: str) -> str:
    """The `make info` table."""
    rows = [("RAM total", f"{res.ram_total_mb / 1024:.1f} GB ({res.limit_source}; host "
                          f"{res.host_ram_total_mb / 1024:.1f} GB)"),
            ("RAM available", f"{res.ram_available_mb / 1024:.1f} GB"),
            ("CPUs", f"{res.cpus} ({res.cpu_source})")]
    for g in res.gpus:
        rows.append((f"GPU {g.index}", f"{g.name}, {g.total_mb / 1024:.1f} GB, {g.free_mb / 1024:.1f} GB free, "
                                       f"bf16 {'yes' if g.bf16 else 'no'}"))
    if shape:
        rows.append(("model", f"{model_name}: {shape.total_params / 1e6:,.1f}M params, {shape.layers} layers, "
                              f"hidden {shape.hidden}, vocab {shape.vocab}"))
    rows.append(("tier", plan.tier))
    width = max(len(k) for k, _ in rows)
    out = ["detected:"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["", "settings:"]
    for var, (value, why) in plan.decisions.items():
        out.append(f"  {var:<22} = {str(value):<10} {why}")
    if plan.estimate:
        b = plan.estimate.breakdown()
        kind = "VRAM" if plan.device == "cuda" else "RSS"
        out += ["", f"predicted peak {kind}: {b['total_mb']:,.0f} MB of a {plan.budget_mb:,.0f} MB budget",
                "  " + ", ".join(f"{k.removesuffix('_mb')} {v:,.0f}" for k, v in b.items() if k != "total_mb")]
    out += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(out)


def env_template() -> str:
    """The .env.template text: every variable, commented out at its default, with its help and,
    for those TIER=auto decides when you leave them unset, what each tier sets."""
    lines, section = ["# Copy to .env and uncomment what you change. Precedence: make/CLI VAR=value > environment",
                      "# > .env > these defaults. Generated by `python -m app env-template`; a test keeps it in sync."], None
    tiered = _tier_settings()
    for sec, var, shown, help_, choices in documented():
        if sec != section:
            lines.append(f"\n# ---- {sec} ----")
            section = sec
        lines.append(f"# {help_}" + (f" ({'|'.join(choices)})" if choices else ""))
        if var in tiered:
            lines.append(f"# unset, TIER=auto sets: {tiered[var]}")
        lines.append(f"# {var}={shown}")
    return "\n".join(lines) + "\n"


def _tier_settings() -> dict[str, str]:
    """VARIABLE -> what the tiers set it to, from this module's own tables."""
    tiers = [t for _, t in CPU_TIERS + GPU_TIERS]

    def per_tier(attr: str) -> str:
        return ", ".join(f"{t.name} {getattr(t, attr)}" for t in tiers if getattr(t, attr) is not None)

    return {"QUANT_LEVEL": per_tier("quant"), "MAX_SAMPLES": per_tier("samples"), "BATCH_SIZE": per_tier("batch"),
            "GRAD_ACCUM": per_tier("grad_accum"), "LORA_R": per_tier("lora_r") + " (CPU tiers keep the default)",
            "MAX_SEQ_LEN": "the length that keeps 95% of the training samples whole, then shortened only to fit memory",
            "GRADIENT_CHECKPOINTING": "on only when the plan needs it to fit memory (auto)"}
