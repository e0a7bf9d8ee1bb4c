"""Speed policy, decided before anything loads: packing and the compute precision.

- PACKING: a micro-batch's samples are concatenated into rows with restarting ``position_ids``
  (app.data.encode.PackingCollator); transformers then builds a block-diagonal causal mask, so the
  samples do not see each other and the loss is the padded batch's loss without the padding.
  It relies on the modeling code deriving the mask from position_ids, which the native GLM,
  Qwen2/3, Llama and Gemma-3 code does (tests/training/test_speed.py checks each family against
  unpacked losses and against a contaminated mask) when no 2D attention mask and no past key
  values are given. P-Tuning's prefixes are past key values and remote code builds its own
  masks: those train padded.
- PRECISION=auto: bf16 autocast where the hardware has fast bf16 (a CUDA GPU with it; a CPU with
  AVX512-BF16 or AMX), fp16 autocast on an older CUDA GPU, fp32 otherwise. On CPU, 4-bit and 8-bit
  layers choose their own compute dtype, so quantized runs keep fp32 around them.

- QUANT_LEVEL that another setting fixes (``quant_needed``): the tier's pick and the memory fit's
  escalation both give way to it; an explicit QUANT_LEVEL that differs is refused by Config.validate.

The Trainer hooks these choices need are in app.training.kernels.
"""

from __future__ import annotations

from app.config import Config
from app.core.errors import UserError

# model_type values whose transformers modeling code turns restarting position_ids into a
# block-diagonal mask (masking_utils.find_packed_sequence_indices), each checked by a test.
PACKING_FAMILIES = ("glm", "glm4", "qwen2", "qwen3", "llama", "gemma3_text")


def packing_choice(cfg: Config, model_type: str | None) -> tuple[bool, str]:
    """(pack?, why) for this run; PACKING=on where it cannot work is a UserError."""
    setting = cfg.train.packing
    if setting == "off":
        return False, "PACKING=off"
    blocker = None
    if cfg.lora.method == "ptuning":
        blocker = "P-Tuning's prefixes are past key values, which turn the packed-sequence mask off"
    elif cfg.train.stage != "sft":
        blocker = (
            f"STAGE={cfg.train.stage} runs TRL's preference trainer, which pads its batches (TRL 1.16 has its "
            "padding-free mode switched off)"
        )
    elif cfg.train.torch_compile:
        blocker = (
            "TORCH_COMPILE=true: torch's compiled backward of the per-sample attention fails once the "
            "packed row length changes (an inductor stride assertion, torch 2.13 on CPU)"
        )
    elif cfg.model.trust_remote_code:
        blocker = "remote model code (TRUST_REMOTE_CODE) builds its own attention masks"
    elif model_type not in PACKING_FAMILIES:
        blocker = (
            f"model type {model_type!r} is not one whose packed-sequence masking is tested "
            f"({', '.join(PACKING_FAMILIES)})"
        )
    if blocker and setting == "on":
        raise UserError(f"PACKING=on: {blocker}; use PACKING=auto (pads each micro-batch instead)")
    if blocker:
        return False, blocker
    return True, "PACKING=on" if setting == "on" else "native model code, no prefixes"


def resolve_precision(cfg: Config, cuda: bool) -> str:
    """'fp32', 'bf16' or 'fp16': the Trainer's autocast dtype for this run."""
    from app.models.quantization import bf16_supported

    p, quant = cfg.train.precision, cfg.resources.quant_level
    if p == "bf16" and not bf16_supported(cuda):
        raise UserError(
            "PRECISION=bf16: this "
            + ("GPU" if cuda else "CPU (no AVX512-BF16/AMX)")
            + " has no fast bf16; use PRECISION=auto"
        )
    if p == "fp16" and not cuda:
        raise UserError(
            "PRECISION=fp16 is for CUDA GPUs (fp16 matmuls on a CPU are emulated and slow); use PRECISION=auto"
        )
    if p != "auto":
        return p
    if cuda:
        return "bf16" if bf16_supported(True) else "fp16"
    if quant in ("8bit", "4bit"):  # the quantized layers already compute in bf16 where the CPU has it
        return "fp32"
    return "bf16" if bf16_supported(False) else "fp32"


def bf16_frozen_weights(cfg: Config, precision: str, cuda: bool) -> bool:
    """Store the frozen dense weights in bf16 on a CPU with fast bf16 (AVX512-BF16 / AMX).

    - LoRA, unquantized, under bf16 autocast: autocast would cast every fp32 weight to bf16 in each
      forward, and keep the residual stream, norms and LoRA dropout in fp32 between the bf16 matmuls:
      on the bench model that was ~30% of a step in copies and fp32 elementwise work.
    - 4-bit or 8-bit: the weights left unquantized are the embeddings and the output head, which at a
      65k-150k vocabulary are 0.5-1.2B parameters: 2-5 GB in fp32, a third of a 6B QLoRA run's peak
      in 8 GB (bench/scale.md). They stay bf16 (the dtype the 4-bit layers compute in), the norms go
      to fp32 as peft does, and the residual stream stays fp32 (app.models.quantization.prepare_for_training).
      LLaMA-Factory leaves them in the load dtype too; peft's own preparation upcasts them.
    The weights are frozen, so nothing is lost by storing them in the dtype they are computed in
    (GPU recipes do the same); LoRA weights, their gradients and AdamW's state stay fp32.
    Full tuning keeps fp32 master weights; P-Tuning's fp32 prefixes would meet bf16 keys unquantized.
    """
    from app.models.quantization import half_embeddings_on_cpu

    quant = cfg.resources.quant_level
    if cuda or cfg.lora.method == "full":
        return False
    if quant in ("4bit", "8bit"):
        return half_embeddings_on_cpu(quant, cuda)
    return precision == "bf16" and cfg.lora.method == "lora" and quant == "none"


# setting=value -> (the one weight format it works with, why, what keeps the tier's format instead). Every
# other option (DoRA, rsLoRA, LORA_INIT=gaussian, NEFTune, P-Tuning) trains on none, 8bit and 4bit alike
# (tests/plan/test_option_matrix.py), so the plan may pick any of them.
QUANT_NEEDS = {
    "METHOD=qlora": ("4bit", "is LoRA on a 4-bit model", "METHOD=lora"),
    "METHOD=full": ("none", "trains every weight, which cannot be quantized", "METHOD=lora"),
    "PRECISION=bf16": ("none", "autocasts unquantized weights", "PRECISION=auto"),
    "LORA_INIT=pissa": ("none", "rewrites the base's weights while training", "LORA_INIT=default"),
    "LORA_INIT=olora": ("none", "rewrites the base's weights while training", "LORA_INIT=default"),
    "LORA_INIT=loftq": ("4bit", "fits LoRA to a 4-bit base's quantization error", "LORA_INIT=default"),
}


def quant_needed(cfg: Config) -> tuple[str, str, str, str] | None:
    """(QUANT_LEVEL, the setting that needs it, why, the change that frees it) when a setting works with one
    weight format only, else None. METHOD first: it decides whether LoRA settings apply at all."""
    for setting in (f"METHOD={cfg.lora.method}", f"PRECISION={cfg.train.precision}", f"LORA_INIT={cfg.lora.lora_init}"):
        if setting in QUANT_NEEDS:
            level, why, instead = QUANT_NEEDS[setting]
            return level, setting, why, instead
    return None
