"""Where a 6B 4-bit training step goes: two decoder layers of ChatGLM3-6B's shape, profiled (issue 31).

bench/scale.md times whole 6B steps inside an 8 GB cgroup, but a whole step cannot be profiled there (the
profiler's own memory would not fit). The step is 28 identical decoder layers, so two of them show its
make-up: a random GLM with ChatGLM3-6B's block (hidden 4096, ffn 13696, 2 KV groups) and 2 layers,
loaded by the tool at QUANT_LEVEL=4bit with GRADIENT_CHECKPOINTING=on and one sample per micro-batch, as
the 8 GB tier plans it, then one training step of a DuIE sample under torch.profiler. The embeddings and
the head (bf16, not quantized) are left out: the profiled step is the decoder's, its loss a stand-in.
Run by bench/bench_speed.py (`make bench`); its section goes into bench/results.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.scale_models import CHATGLM3_6B, SHAPES, build_random_glm

NAME = "chatglm3-6b-2layers"
SHAPES[NAME] = {**CHATGLM3_6B, "num_hidden_layers": 2}

PROFILE = r"""
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from app import Config, FineTuner
from app.plan.precision import resolve_precision
from app.training.kernels import collator
cfg = Config.from_dict(json.loads(sys.argv[1]))
ft = FineTuner(cfg).setup().prepare_data().load_model()
precision = resolve_precision(cfg, False)
collate = collator(cfg, ft.model, ft.tokenizer, precision)
rows = sorted(ft.train_rows, key=lambda r: abs(len(r["input_ids"]) - int(sys.argv[2])))
batch = collate(rows[:1])
batch.pop("num_tokens", None)
model = ft.model.train()
inner = model.get_base_model().model  # the decoder without the head: a layer's work is what 28 layers multiply
kw = {k: v for k, v in batch.items() if k != "labels"}
def step():
    inner(**kw, use_cache=False).last_hidden_state.float().square().mean().backward()
step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
ops = [{"op": e.key, "ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in prof.key_averages()]
print("PROFILE " + json.dumps({"rows": ops, "tokens": int(batch["input_ids"].numel()),
                                "total_ms": sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000}))
"""


def category(op: str) -> str:
    """The 4-bit step's kinds of work: bitsandbytes' unpacking, then make bench's own kinds (bench_speed)."""
    from bench.bench_speed import category as speed_category

    if "dequantize" in op or op.startswith("bitsandbytes::"):
        return "bnb 4-bit dequantization"
    if "embedding" in op:
        return ""  # the input lookup, not the layers' work
    return speed_category(op)


def profile_4bit(data: Path, tokens: int, threads: int, run: Any, env: dict[str, str]) -> dict[str, Any]:
    """One profiled step of the 2-layer 6B-shaped model at 4-bit on a sample of about ``tokens`` tokens."""
    model = build_random_glm(NAME)
    values = {
        "MODEL_NAME": str(model),
        "DATA_PATH": str(data),
        "OUTPUT_DIR": "bench/results/profile-4bit",
        "MAX_SAMPLES": 200,
        "VAL_SIZE": 0,
        "MAX_SEQ_LEN": 336,
        "BATCH_SIZE": 1,
        "GRAD_ACCUM": 1,
        "QUANT_LEVEL": "4bit",
        "GRADIENT_CHECKPOINTING": "on",
        "TIER": "none",
        "NUM_THREADS": threads,
        "SEED": 42,
    }
    proc, _, _ = run(
        [sys.executable, "-c", PROFILE, json.dumps(values), str(tokens)],
        "profile: one 4-bit step of two 6B-shaped layers",
        env,
    )
    prof = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PROFILE "))[8:])
    groups: dict[str, float] = {}
    for r in prof["rows"]:
        kind = category(r["op"])
        if kind:
            groups[kind] = groups.get(kind, 0.0) + r["ms"]
    top = sorted((r for r in prof["rows"] if category(r["op"])), key=lambda r: -r["ms"])[:8]
    layer = CHATGLM3_6B
    h, f, kv = layer["hidden_size"], layer["intermediate_size"], layer["num_key_value_heads"] * layer["head_dim"]
    params_per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    return {"tokens": prof["tokens"], "groups": groups, "top": top, "params_per_layer": params_per_layer, "layers": 2}


def section(p: dict[str, Any], peak_bf16: float) -> list[str]:
    """bench/results.md's lines for the 4-bit profile: the shares, and what bounds the step."""
    layer_work = p["groups"]
    total = sum(layer_work.values())
    deq, mm = layer_work.get("bnb 4-bit dequantization", 0.0), layer_work.get("matmul", 0.0)
    # checkpointing: forward, recomputed forward, backward (input gradients): 8 FLOPs per weight and token
    flops = 8 * p["params_per_layer"] * p["layers"] * p["tokens"]
    mm_rate = flops / (mm / 1000) / 1e9 if mm else 0.0
    lines = [
        "",
        f"## Where a 6B 4-bit step goes (bench/profile_4bit.py: two ChatGLM3-6B-shaped layers, QUANT_LEVEL=4bit, "
        f"checkpointing on, one sample of {p['tokens']} tokens, as the 8 GB tier runs it)",
        "",
        "| category (the two decoder layers) | ms | share |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {v:,.0f} | {100 * v / total:.0f}% |" for k, v in sorted(layer_work.items(), key=lambda kv: -kv[1])
    ]
    lines += ["", "| op (self CPU time) | ms | calls |", "|---|---|---|"]
    lines += [f"| `{x['op']}` | {x['ms']:,.0f} | {x['calls']} |" for x in p["top"]]
    lines += [
        "",
        f"The layers' matmuls ran at {mm_rate:,.0f} GFLOP/s ({100 * mm_rate / peak_bf16:.0f}% of the bf16 "
        f"peak) on {p['tokens']}-row inputs, and the whole layer step at "
        f"{flops / (total / 1000) / 1e9:,.0f} GFLOP/s ({100 * flops / (total / 1000) / 1e9 / peak_bf16:.0f}%), "
        f"counting 8 FLOPs per weight and token (forward, the checkpointed recompute, input gradients). "
        f"bitsandbytes unpacks every 4-bit weight to bf16 three times a step (forward, recompute, backward) "
        f"before its matmul: {100 * deq / total:.0f}% of the layers' time. That share does not shrink with "
        f"faster matmuls, only with more tokens per unpacked weight (a longer micro-batch, which 8 GB does "
        f"not hold) or a fused 4-bit matmul (bitsandbytes' CPU one comes from the kernels hub, "
        f"`kernels-community/quantization-bitsandbytes`, unreachable here, and covers the forward only).",
    ]
    return lines


if __name__ == "__main__":
    print(json.dumps(SHAPES[NAME]))
