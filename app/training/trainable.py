"""The model as training wants it: weights loaded (quantized as planned), the packed-attention and
checkpointing hooks in place, then the method's trainable part (every weight, a P-Tuning prefix,
or LoRA). One path; METHOD picks the branch at the end."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from app.config import Config
from app.models.loading import apply_lora, apply_ptuning, load_model
from app.plan.precision import bf16_frozen_weights, packing_choice, resolve_precision
from app.training.kernels import fast_lora_dropout, lora_inputs_stay_bf16, use_packed_attention

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def trainable_model(cfg: Config, model_path: str, cuda: bool) -> PreTrainedModel | PeftModel:
    """Weights + the method's trainable part, seeded so LoRA's init is reproducible."""
    from transformers import set_seed

    from app.models.quantization import describe, prepare_for_training, stored_bytes

    quant, ckpt = cfg.resources.quant_level, cfg.resources.gradient_checkpointing == "on"
    set_seed(cfg.train.seed)
    precision = resolve_precision(cfg, cuda)
    half = bf16_frozen_weights(cfg, precision, cuda)
    full = cfg.lora.method == "full"
    model = load_model(model_path, cfg.model.trust_remote_code, quant, bf16=half, precision=precision, trains_all=full)
    log.info("weights: %s, %.0f MB stored", describe(quant, cuda), stored_bytes(model) / 2**20)
    model.config.use_cache = False  # the KV cache only costs memory during training
    if packing_choice(cfg, getattr(model.config, "model_type", None))[0]:
        use_packed_attention(model)  # per-sample causal attention in packed rows (app/training/kernels.py)
    model = prepare_for_training(model, quant, ckpt, half_embeddings=half)
    if ckpt and quant == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if full:
        model.requires_grad_(True)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        n = sum(p.numel() for p in model.parameters())
        log.info("full fine-tuning: %s trainable parameters, %s (the optimizer's master weights)", f"{n:,}", dtype)
        return model
    if cfg.lora.method == "ptuning":
        return apply_ptuning(model, cfg)
    if (
        cfg.train.stage != "sft" and cfg.predict.adapter_dir
    ):  # continue that adapter (app/training/preference_trainer.py)
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, cfg.predict.adapter_dir, is_trainable=True)
    else:
        tuned = apply_lora(model, cfg, model_path)
    if cfg.train.stage == "sft":  # a preference stage trains without dropout (app/training/preference_trainer.py)
        fast_lora_dropout(tuned)  # the same dropout, a quarter of a CPU step cheaper (app/training/kernels.py)
    if half:
        lora_inputs_stay_bf16(tuned)
    return tuned


def reference_model(cfg: Config, model_path: str, cuda: bool) -> PreTrainedModel:
    """STAGE=dpo/kto with METHOD=full: the frozen second copy the loss compares with (LoRA needs none)."""
    precision = resolve_precision(cfg, cuda)
    half = bf16_frozen_weights(cfg, precision, cuda)
    ref = load_model(model_path, cfg.model.trust_remote_code, "none", bf16=half, precision=precision)
    ref.requires_grad_(False)
    log.info("reference model: a second, frozen copy of %s (METHOD=full trains every weight of the first)", model_path)
    return ref.eval()
