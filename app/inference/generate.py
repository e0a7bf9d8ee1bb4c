"""Batched generation: many prompts at once, left-padded, KV-cached (file-mode prediction,
evaluation and the F1 evaluation during training all use it)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

from app.data.encode import prompt_text

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from app.inference.llamacpp_model import LlamaCppCausalLM
    from app.inference.onnx_model import OnnxCausalLM

    # What answers prompts (Predictor.model): a transformers model, with or without its adapter, or an
    # ONNX Runtime / llama.cpp model behind the same generate(), __call__, .device and .eval().
    CausalLM = PreTrainedModel | PeftModel | OnnxCausalLM | LlamaCppCausalLM


def max_new_tokens_for(tokenizer: PreTrainedTokenizerBase, answers: list[str], cap: int = 1024) -> int:
    """Long enough for the longest gold answer (+25% and EOS), so no answer is cut by the budget."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=16)
    return min(cap, math.ceil(longest * 1.25) + 8)


def generate_batch(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
    sampling: dict[str, Any] | None = None,
    stats: dict[str, int] | None = None,
) -> list[str]:
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
            batch = order[i : i + batch_size]
            enc = tokenizer([texts[j] for j in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            with torch.no_grad():
                out = cast(Any, model).generate(  # a PeftModel's generate is its base's, through __getattr__
                    **enc,
                    max_new_tokens=max_new_tokens,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    **(sampling or {"do_sample": False}),
                )
            new = out[:, enc["input_ids"].shape[1] :]
            if stats is not None:
                stats["new_tokens"] = stats.get("new_tokens", 0) + int((new != tokenizer.pad_token_id).sum())
            for j, answer in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                outputs[j] = answer
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return outputs
