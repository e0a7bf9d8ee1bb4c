"""The peak memory the plan predicts for a Config: app.plan.estimator's model fed with the settings the run will
really use (precision, stored dtypes, the stage's sequences and reference copy, what METHOD trains)."""

from __future__ import annotations

from app.config import Config
from app.plan.estimator import Estimate, ModelShape, estimate


def predict_peak(cfg: Config, shape: ModelShape, cuda: bool) -> Estimate:
    """The estimator for cfg's current settings (full tuning trains and stores every weight)."""
    from app.core.errors import UserError
    from app.models.quantization import gpu_weights_bf16
    from app.plan.precision import bf16_frozen_weights, resolve_precision
    from app.plan.stages import stage_cost

    try:
        precision = resolve_precision(cfg, cuda)
        half = bf16_frozen_weights(cfg, precision, cuda)
    except UserError:  # an impossible PRECISION is reported by training itself
        precision, half = "auto", False
    cost = stage_cost(cfg)
    return estimate(
        shape,
        cfg.resources.quant_level,
        cfg.lora.lora_r,
        cfg.train.batch_size,
        cfg.data.max_seq_len,
        cfg.resources.gradient_checkpointing == "on",
        cuda,
        cfg.train.optim,
        trainable_params=trainable_params(cfg, shape),
        half_weights=half,
        sequences=cost.sequences,
        reference_copy=cost.reference_copy,
        fp32_weights=cuda and not half and not gpu_weights_bf16(precision),
        trains_weights=cfg.lora.method == "full",
    )


def trainable_params(cfg: Config, shape: ModelShape) -> int:
    """The weights cfg's METHOD trains: every one (full), the prefixes and their optional projection (P-Tuning),
    or LoRA's rank x its targets' in + out features. The memory plan and the time estimate both count these."""
    if cfg.lora.method == "full":
        return shape.total_params
    if cfg.lora.method == "ptuning":  # a key and a value prefix per layer (+ the optional MLP)
        prefix = cfg.lora.pre_seq_len * shape.layers * 2 * shape.hidden
        return prefix + (
            2 * shape.hidden * shape.hidden + shape.hidden * prefix // cfg.lora.pre_seq_len
            if cfg.lora.prefix_projection
            else 0
        )
    return cfg.lora.lora_r * shape.lora_io
