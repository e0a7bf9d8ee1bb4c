"""Training kernels behind the speed choices (app.plan.precision decides them): per-sample
attention in packed rows, a cheaper LoRA dropout, and bf16 LoRA inputs under autocast (the
packing-aware Trainer methods are in app.training.trainer)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from app.config import Config
    from app.data.encode import Collator, PackingCollator

log = logging.getLogger(__name__)


def lora_inputs_stay_bf16(model: torch.nn.Module) -> int:
    """Under autocast, let LoRA layers pass their bf16 input to lora_A as it is; returns how many.

    peft casts a LoRA layer's input to the adapter's dtype (fp32) before dropout and lora_A, and
    autocast casts it straight back to bf16 for the matmul: two copies of every LoRA input per
    forward. Outside autocast (generation in the F1 evaluation, predict) the cast is still
    needed, so the flag peft reads is true exactly when autocast is off.
    """
    import torch

    class CastOutsideAutocast:
        def __bool__(self) -> bool:
            return not torch.is_autocast_enabled("cpu")

    flag, n = CastOutsideAutocast(), 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            cast(Any, module).cast_input_dtype_enabled = flag  # peft's flag, read as a bool each forward
            n += 1
    return n


PACKED_ATTENTION = "packed_sdpa"


def use_packed_attention(model: PreTrainedModel) -> bool:
    """Switch an SDPA model to ``packed_sdpa``: causal attention inside each packed sample only.

    The block-diagonal mask transformers builds for packed rows makes SDPA compute every
    query/key pair of the row and mask most of them away (two ~200-token samples in a 512-token
    row: 4x the causal work), with the mask kernel instead of the causal one. ``packed_sdpa``
    runs SDPA with ``is_causal=True`` on each sample's own slice, from the lengths PackingCollator
    sends along (``packed_seq_lens``); without them (unpacked batches, generation, a KV cache, a
    sample longer than a sliding window) it is plain SDPA with transformers' mask. Returns whether it switched.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # the fallback's mask, as for sdpa
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (see ``use_packed_attention``): [b, s, heads, dim] out."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    lens, window = kwargs.get("packed_seq_lens"), kwargs.get("sliding_window")
    if lens is None or query.shape[2] != key.shape[2] or (window and max(max(r) for r in lens) > window):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # unbind/split, not slicing: their backward is one stack/cat, where every slice's backward
    # would fill a zero tensor of the whole input (that cost more than the masked attention saved)
    rows = []
    for row, q, k, v in zip(lens, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        parts = [
            sdpa(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout_p=dropout, scale=scaling, is_causal=True)
            for qs, ks, vs in zip(q.split(row, dim=1), k.split(row, dim=1), v.split(row, dim=1), strict=True)
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def fast_lora_dropout(model: torch.nn.Module) -> int:
    """Swap PEFT's LoRA input dropout (torch.nn.Dropout) for FastDropout; returns how many.

    The same regularization -- each input element kept with probability 1 - p and scaled by
    1 / (1 - p) -- drawn from 16-bit random integers (p exact to 1/65536) instead of a float
    Bernoulli tensor, with a bool mask kept for backward. On a CPU this dropout runs on every
    LoRA layer's full input (q/k/v/o/gate/up/down: ~10M elements per layer for 1,600 tokens),
    and torch's version cost a quarter of a training step on the bench model.
    """
    import torch

    fast = fast_dropout_class()
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                drops[name] = fast(drop.p)
                swapped += 1
    return swapped


@functools.cache
def fast_dropout_class() -> type:
    """FastDropout (built on first use: this module imports no torch at import time)."""
    import torch

    class MaskedScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
            ctx.save_for_backward(keep)
            ctx.scale = scale
            return torch.where(keep, x, 0).mul_(scale)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            (keep,) = ctx.saved_tensors
            return torch.where(keep, grad, 0).mul_(ctx.scale), None, None

    class FastDropout(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p
            self.threshold = round(p * 65536) - 32768  # keep where a uniform int16 is >= this

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            # 64 random bits per int64 draw, read as four int16: a quarter of randint's generator
            # calls (torch's CPU generator is the slow part of dropout)
            bits = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
            keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= self.threshold
            return MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return FastDropout


def collator(
    cfg: Config, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, precision: str
) -> Collator | PackingCollator:
    """Packed rows where the model and method allow it (PACKING, app.plan.precision), else padded rows."""
    from app.data.encode import Collator, PackingCollator
    from app.plan.precision import packing_choice

    pack, why = packing_choice(cfg, getattr(getattr(model, "config", None), "model_type", None))
    log.info("packing %s (%s); precision %s", "on" if pack else "off", why, precision)
    if pack:
        # per-sample attention (packed_sdpa) costs the same in one long row: no padded row tails
        per_sample = getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION
        return PackingCollator(tokenizer.pad_token_id, 0 if per_sample else cfg.data.max_seq_len)
    return Collator(tokenizer.pad_token_id)
