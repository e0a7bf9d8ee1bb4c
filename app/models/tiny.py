"""Tiny random-weight models for offline runs, tests and CI.

No hub is reachable here or in CI, so ``MODEL_NAME=tiny`` (GLM), ``tiny-qwen2`` and
``tiny-llama`` build a 2-layer model of that family from a native transformers config, with
a byte-level BPE tokenizer trained locally on the project's own synthetic data plus some
English, and the family's chat template. Everything is seeded, so the same files (and
therefore the same golden losses) come out on every machine. Weights are never committed:
they are rebuilt under ``models/`` on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.atomic import built_whole

if TYPE_CHECKING:
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

_GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


_GEMMA_TEMPLATE = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class TinyFamily:
    config_cls: str  # transformers config class name
    specials: tuple[str, ...]
    eos: str  # the token that ends an assistant turn (what training appends)
    pad: str
    template: str
    stop: tuple[str, ...] = ()  # extra tokens that end generation
    bos: str | None = None


FAMILIES: dict[str, TinyFamily] = {
    "tiny": TinyFamily(
        "GlmConfig",
        ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        "<|endoftext|>",
        "<|endoftext|>",
        _GLM_TEMPLATE,
        ("<|user|>", "<|observation|>"),
    ),
    "tiny-qwen2": TinyFamily(
        "Qwen2Config",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        "<|endoftext|>",
        _CHATML_TEMPLATE,
        ("<|endoftext|>",),
    ),
    "tiny-qwen3": TinyFamily(
        "Qwen3Config",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        "<|endoftext|>",
        _CHATML_TEMPLATE,
        ("<|endoftext|>",),
    ),
    "tiny-gemma3": TinyFamily(
        "Gemma3TextConfig",
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<end_of_turn>",
        "<pad>",
        _GEMMA_TEMPLATE,
        ("<eos>",),
        bos="<bos>",
    ),
    "tiny-llama": TinyFamily(
        "LlamaConfig",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|end_of_text|>",
        _LLAMA3_TEMPLATE,
        ("<|end_of_text|>",),
        bos="<|begin_of_text|>",
    ),
}

# Small enough that a CPU test step takes milliseconds, big enough for GQA and real LoRA targets.
_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)

_ENGLISH = [
    "Extract every subject, predicate and object triplet from the sentence and answer in JSON.",
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a small language model on a laptop is possible with LoRA and quantization.",
    "Answer the question below. Keep the answer short and precise.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "Translate the following sentence into Chinese: the weather is nice today.",
    "Summarize the paragraph in one sentence.",
    "Instruction: Input: Answer: Response: ### system user assistant",
]


def tiny_dir(name: str, models_dir: str | Path = "models") -> Path:
    return Path(models_dir) / ("tiny-glm" if name == "tiny" else name)


def resolve_model(name: str, models_dir: str | Path = "models") -> str:
    """Map 'tiny*' to its local dir, building it on first use; pass any other name through."""
    if name not in FAMILIES:
        return name
    path = tiny_dir(name, models_dir)
    if not (path / "config.json").is_file():
        build_tiny_model(name, path)
    return str(path)


def _corpus(seed: int) -> list[str]:
    from app.data.synthetic import generate_samples

    lines = []
    for s in generate_samples(1500, seed=seed):
        lines += [s["context"], s["target"]]
    return lines + _ENGLISH * 20


# llama.cpp's name for the split these tokenizers use (runtime_pre_tokenizer): GPT-2's regex. They learn their
# merges with every CJK character its own word (training_pre_tokenizer), so no merge joins two of them or one
# and a neighbour; with GPT-2's split alone at run time each is still one token (or its bytes), and llama.cpp
# has that split, which it has not for the training one. app/inference/gguf_convert.py names it to llama.cpp's
# converter (these tokenizers' hashes are in no table of its); tests/inference/test_gguf_tokens.py proves that llama.cpp
# then gives the same ids on Chinese, English and JSON.
GGUF_PRE_TOKENIZER = "gpt-2"


def training_pre_tokenizer() -> PreTokenizer:
    """Every CJK character its own pre-token, then GPT-2's byte-level split."""
    from tokenizers import Regex, pre_tokenizers

    # A name then tokenizes identically in the sentence and in the JSON answer, so extraction is token
    # copying (BPE over whole runs of Chinese text merges across word boundaries differently in each
    # context, which a small model cannot learn).
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[\u3400-\u9fff\uf900-\ufaff]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def runtime_pre_tokenizer() -> PreTokenizer:
    """GPT-2's byte-level split (llama.cpp's "gpt-2")."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def build_tokenizer(name: str, vocab_size: int = 3000, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (Chinese + English) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = training_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fam.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.pre_tokenizer = runtime_pre_tokenizer()  # see GGUF_PRE_TOKENIZER
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=fam.eos,
        pad_token=fam.pad,
        bos_token=fam.bos,
        chat_template=fam.template,
        model_max_length=_DIMS["max_position_embeddings"],
    )


def _as_checkpoints(name: str, dims: dict) -> dict:
    """Config values the family's real checkpoints have where the transformers class's default (sized for
    another head_dim) does not: llama.cpp assumes them, so a GGUF of the tiny model would be another model."""
    if name == "tiny-gemma3":
        # Gemma-3 270M/1B/4B/12B scale attention by 1/sqrt(head_dim) (query_pre_attn_scalar == head_dim == 256);
        # the class default 256 with head_dim 16 scales by 1/16, and llama.cpp always uses 1/sqrt(head_dim).
        return {"query_pre_attn_scalar": dims["head_dim"]}
    return {}


def build_tiny_model(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    dims: dict | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight 2-layer model + tokenizer of family ``name`` to ``out_dir``.

    ``dims`` / ``vocab_size`` override the tiny sizes (the memory benchmark builds a ~100M model
    this way; ids past the tokenizer's own vocabulary are simply never produced). ``dtype``: the
    weights' as built and saved ("bfloat16" halves a large random model's time and disk).

    Built in a temp dir next to the target and renamed into place, so an interrupted build
    never leaves a half-written model that a later run would try to load.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if name not in FAMILIES:
        raise ValueError(f"MODEL_NAME={name!r} is not a tiny model; use one of {', '.join(FAMILIES)}")
    fam, out = FAMILIES[name], Path(out_dir)
    log.info("building %s (random 2-layer %s) in %s", name, fam.config_cls.removesuffix("Config"), out)
    tokenizer = build_tokenizer(name, seed=seed)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in (fam.eos, *fam.stop)]
    dims = {**_DIMS, **(dims or {})}
    config = getattr(transformers, fam.config_cls)(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **dims,
        **_as_checkpoints(name, dims),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    with built_whole(out) as tmp:  # another process may win the race: its copy is kept
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
