"""Predict peak training memory before any weight is loaded.

Inputs: the model's shape (read from its config on the meta device: no weights touched),
the quant level, the LoRA rank and targets, batch x seq, gradient checkpointing and the
optimizer state. Output: predicted peak RSS on CPU, or peak VRAM on CUDA, with a breakdown.

The activation coefficients are calibrated against measured peaks on this project's own
sweep (`make bench-memory`, report in bench/); the bench checks the error stays within ±20%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from app.models.quantization import bf16_supported

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MB = 2**20

# Resident memory of the Python process with torch, transformers, peft, bitsandbytes, the
# Trainer, TensorBoard and matplotlib imported, before a model is loaded (x86-64 Linux).
RUNTIME_MB = 500.0
# CUDA context + allocator slack, for VRAM predictions.
CUDA_CONTEXT_MB = 400.0
# Bytes stored per weight: 8-bit = int8 + row scale; 4-bit NF4 = packed nibble + absmax per 64
# (double-quantized to 8 bits with a small second-level state).
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# Saved activations per token per layer, in units of (hidden, intermediate) elements: a LoRA'd
# block keeps ~12 hidden-sized tensors (norm in/out, a dropout copy per LoRA input, q/k/v/attn
# out, residuals) and ~4 intermediate-sized ones. Attention probabilities per (head x seq^2);
# the fp32 logits and their gradient per (token x vocab). Fitted by least worst-case error on
# bench/bench_memory.py's sweep (0.5M-0.9B params, batch 1-4, checkpointing off/on) with
# memory_monitor.tune_allocator() in effect; bench/memory-validation.md checks unseen shapes.
ACT_HIDDEN = 12.0
ACT_INTER = 4.0
ACT_ATTN = 2.0
ACT_LOGITS = 2.0
# AdamW keeps param + grad + 2 moments in fp32 for every trainable parameter.
OPTIM_BYTES = {"adamw": 16, "sgd": 8, "adafactor": 10}


@dataclass
class ModelShape:
    total_params: int
    linear_params: int  # quantizable projections inside the blocks
    other_params: int  # embeddings, norms, the output head
    max_linear: int  # largest projection: the transient dequantized copy in backward
    lora_io: int  # sum over LoRA targets of (in + out) features; x rank = LoRA params
    linear_in: int  # sum of the block projections' input features, per layer
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    max_positions: int


def _cfg(config: PretrainedConfig, *names: str, default: int = 0) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def model_shape(name_or_path: str, targets: list[str] | None = None, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters on the meta device: exact shapes, zero bytes allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from app.models.loading import NEVER_TARGET, detect_lora_targets

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    targets = targets or detect_lora_targets(model)
    linear = max_linear = lora_io = linear_in = 0
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear) and leaf not in NEVER_TARGET:
            linear += mod.weight.numel()
            linear_in += mod.in_features
            max_linear = max(max_linear, mod.weight.numel())
            if leaf in targets:
                lora_io += mod.in_features + mod.out_features
    total = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", None) or config
    layers = _cfg(text, "num_hidden_layers", "num_layers", "n_layer", default=1)
    return ModelShape(
        total_params=total,
        linear_params=linear,
        other_params=total - linear,
        max_linear=max_linear,
        lora_io=lora_io,
        linear_in=linear_in // layers,
        layers=layers,
        hidden=_cfg(text, "hidden_size", "n_embd", "d_model"),
        intermediate=_cfg(
            text, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * _cfg(text, "hidden_size")
        ),
        vocab=_cfg(text, "vocab_size", "padded_vocab_size"),
        heads=_cfg(text, "num_attention_heads", "n_head"),
        max_positions=_cfg(text, "max_position_embeddings", "seq_length", "n_positions", default=4096),
    )


@dataclass
class Estimate:
    runtime_mb: float
    weights_mb: float
    trainable_mb: float
    activations_mb: float
    logits_mb: float
    transient_mb: float

    @property
    def total_mb(self) -> float:
        return (
            self.runtime_mb
            + self.weights_mb
            + self.trainable_mb
            + self.activations_mb
            + self.logits_mb
            + self.transient_mb
        )

    def breakdown(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in {**asdict(self), "total_mb": self.total_mb}.items()}


def estimate(
    shape: ModelShape,
    quant: str,
    lora_r: int,
    batch: int,
    seq: int,
    grad_ckpt: bool,
    cuda: bool = False,
    optim: str = "adamw",
    trainable_params: int | None = None,
    half_weights: bool = False,
    sequences: int = 1,
    reference_copy: bool = False,
    fp32_weights: bool = False,
    trains_weights: bool = False,
) -> Estimate:
    """Peak RSS (CPU) or VRAM (CUDA) in MB for one training configuration.

    ``trainable_params`` overrides the LoRA count (full fine-tuning, prefix tuning).
    ``half_weights``: a CPU run whose frozen weights are stored in bf16 (app.plan.precision.bf16_frozen_weights).
    ``sequences``: sequences per sample in the micro-batch (2 for a DPO pair: app.plan.stages); ``reference_copy``:
    a second frozen copy of the weights (a preference stage's reference under full tuning); ``fp32_weights``: a
    GPU run that keeps its frozen weights fp32 (PRECISION=fp32, or a GPU without bf16:
    app.models.quantization.load_dtype). ``trains_weights``: METHOD=full, whose trained weights are fp32 master
    weights on any device and are themselves the trainable parameters the optimizer bytes count.
    """
    act_bytes = 2 if cuda else 4  # bf16 autocast on GPU; on CPU the fitted constants are fp32's
    dense_bytes = 2 if (cuda and not fp32_weights) or half_weights else 4
    qb = QUANT_BYTES.get(quant, dense_bytes)
    frozen = shape.linear_params * qb + shape.other_params * dense_bytes
    weights = frozen * (2 if reference_copy else 1)
    trainable = trainable_params if trainable_params is not None else lora_r * shape.lora_io
    opt = next((v for k, v in OPTIM_BYTES.items() if k in optim), 16)
    if trains_weights:  # the weights are the fp32 parameters OPTIM_BYTES counts: not twice
        weights = (frozen if reference_copy else 0) + (shape.linear_params + shape.other_params) * 4
        opt -= 4
    batch *= sequences  # a pair's two sequences are one micro-batch of twice the rows
    tokens = batch * seq
    per_layer = (
        tokens * (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate)
        + ACT_ATTN * batch * shape.heads * seq * seq
    )
    if grad_ckpt:  # only each block's input is kept; one block is recomputed at a time
        acts = shape.layers * tokens * shape.hidden + per_layer
    else:
        acts = shape.layers * per_layer
    # LLM.int8() keeps an fp16 copy of every projection's input for backward; 4-bit layers keep
    # their input cast to the compute dtype, a copy only when that is bf16 and activations fp32.
    if quant == "8bit" or (quant == "4bit" and not cuda and bf16_supported(cuda=False)):
        acts += (1 if grad_ckpt else shape.layers) * tokens * shape.linear_in * 2 / act_bytes
    logits = ACT_LOGITS * tokens * shape.vocab * 4  # the loss is computed in fp32
    quantized = quant in QUANT_BYTES
    transient = 2 * shape.max_linear * 4 if quantized else 0
    return Estimate(
        runtime_mb=CUDA_CONTEXT_MB if cuda else RUNTIME_MB,
        weights_mb=weights / MB,
        trainable_mb=trainable * opt / MB,
        activations_mb=acts * act_bytes / MB,
        logits_mb=logits / MB,
        transient_mb=transient / MB,
    )
