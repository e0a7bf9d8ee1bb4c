"""Random GLM models at the sizes users run: ChatGLM3-6B's and GLM-4-9B's shapes, for `make bench-scale`.

No hub is reachable here, so the benchmark builds the shapes itself: transformers' native GLM
architecture (the tiny GLM's family) with the real models' dimensions, random N(0, 0.02) weights in
bf16, and the tiny GLM's tokenizer (its ids are a subset of the vocabulary). The weights are written
one decoder layer at a time into ~2 GB safetensors shards with an index, as a hub checkpoint is laid
out, so building a 9B model never holds more than one shard in memory. Free disk is checked first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from app.core.atomic import built_whole

log = logging.getLogger("bench")

# ChatGLM3-6B: hidden 4096, 28 layers, ffn 13696, multi-query attention with 2 KV groups, vocab 65024.
CHATGLM3_6B = dict(
    hidden_size=4096,
    intermediate_size=13696,
    num_hidden_layers=28,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=8192,
    vocab_size=65024,
)
# GLM-4-9B: the same block, 40 layers and GLM-4's 151,552-token vocabulary.
GLM4_9B = {**CHATGLM3_6B, "num_hidden_layers": 40, "vocab_size": 151552}
SHAPES = {"chatglm3-6b": CHATGLM3_6B, "glm4-9b": GLM4_9B}
SHARD_BYTES = 2 * 2**30


def _layer_of(key: str) -> int:
    """Decoder layer index of a weight name, -1 before the layers (embeddings), 10**6 after (norm, head)."""
    parts = key.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return -1 if "embed" in key else 10**6


def build_random_glm(name: str, models_dir: Path = Path("models"), seed: int = 0) -> Path:
    """models/bench-<name>: a random bf16 GLM of SHAPES[name], built once (a finished dir is reused)."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from app.models.tiny import resolve_model

    out = models_dir / f"bench-{name}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    tiny = Path(resolve_model("tiny", models_dir))
    config = transformers.AutoConfig.from_pretrained(tiny)
    for k, v in SHAPES[name].items():
        setattr(config, k, v)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    need = sum(math.prod(s) for s in shapes.values()) * 2
    free = shutil.disk_usage(models_dir).free
    if free < need + 2 * 2**30:  # and 2 GB to spare for the runs' outputs
        raise SystemExit(
            f"bench-scale: {name} needs {need / 2**30:.1f} GB of disk in {models_dir}, "
            f"{free / 2**30:.1f} GB free; free some space or run with --models chatglm3-6b"
        )
    log.info("building %s: %.2fB parameters, %.1f GB of bf16 shards in %s", name, need / 2 / 1e9, need / 2**30, out)
    gen = torch.Generator().manual_seed(seed)
    with built_whole(out) as tmp:
        weight_map, shard, shard_bytes, files = {}, {}, 0, []

        def flush() -> None:
            nonlocal shard, shard_bytes
            files.append(f"part-{len(files):05d}.safetensors")
            save_file(shard, str(tmp / files[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1]))
            shard, shard_bytes = {}, 0

        for key in sorted(shapes, key=lambda k: (_layer_of(k), k)):
            shape = shapes[key]
            if key.endswith("norm.weight") or "layernorm" in key:
                t = torch.ones(shape, dtype=torch.bfloat16)
            elif key.endswith(".bias"):
                t = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            shard[key], shard_bytes = t, shard_bytes + t.numel() * 2
            if shard_bytes >= SHARD_BYTES:
                flush()
                log.info("%s: %d shards written", name, len(files))
        if shard:
            flush()
        renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
        for old, new in renamed.items():
            os.replace(tmp / old, tmp / new)
        index = {"metadata": {"total_size": need}, "weight_map": {k: renamed[f] for k, f in sorted(weight_map.items())}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        for f in tiny.iterdir():  # tokenizer, chat template and generation config of the tiny GLM
            if f.is_file() and not f.name.startswith(("model", "config")):
                shutil.copy2(f, tmp / f.name)
    return out
