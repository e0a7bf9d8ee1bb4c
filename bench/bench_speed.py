"""Training speed: the tutorial way vs `python -m app train`, side by side on this machine.

In one go, each in its own process: (1) bench/reference_tutorial.py, a plain HF Trainer + PEFT LoRA
script that pads every sample to 512 tokens and trains in fp32, and (2) the project's
`python -m app train` with its defaults (packing, PRECISION=auto). Both: the ~100M random Qwen2
(models/bench-qwen2-100m: hidden 768, 12 layers, vocab 32k), the first 200 samples of
../shared/data/duie-mixed/train.jsonl with its tokenizer and chat template, LoRA r=8/alpha=16/
dropout 0.05 on every linear projection, 1 epoch, effective batch 8, the same learning rate and
schedule. Then generation: the project's file mode vs one-prompt-at-a-time `generate`, the same
adapter and greedy prompts from the dev file. torch.matmul's fp32 and bf16 GFLOP/s are measured
before and after, and MFU is computed against them. A torch.profiler table of one project
training step says where the time goes. Writes bench/results.md and bench/results.json; scratch
runs go to bench/results/ (ignored by git). Run `make bench` (python -m bench.bench_speed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.core.atomic import atomic_write_text, write_json
from app.core.utils import setup_logging, usable_cpus
from app.training.metrics_file import read_metrics

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
OUT = Path("bench/results/speed")
DATA = ROOT.parent / "shared" / "data" / "duie-mixed"
MODEL = Path("models/bench-qwen2-100m")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ---- machine ---------------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Other jobs on the cores skew every number: wait (bounded) for the 1-minute load to settle."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        log.info("load average %.2f > %.2f: waiting for the machine to settle", os.getloadavg()[0], max_load)
        time.sleep(30)
    return os.getloadavg()[0]


def matmul_gflops(dtype_name: str, threads: int, repeats: int = 5) -> float:
    """Best-of GFLOP/s of torch.matmul at the training's shapes (tokens x 768 x 2048) and 2048^3."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    best = 0.0
    for m, k, n in ((2048, 768, 2048), (2048, 2048, 768), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def peaks(threads: int) -> dict[str, float]:
    return {
        "fp32": round(matmul_gflops("float32", threads), 1),
        "bf16": round(matmul_gflops("bfloat16", threads), 1),
        "load": round(os.getloadavg()[0], 2),
    }


# ---- FLOPs -----------------------------------------------------------------------------------------


def train_flops_per_token(config: dict[str, Any], lengths: list[int], lora_r: int) -> float:
    """Model FLOPs of one LoRA training token, averaged over the samples (padding not counted).

    Forward: 2 x every projection and the output head, plus attention scores and values over the
    token's causal context. Backward: the frozen weights need only input gradients (= their forward
    again), attention twice its forward, LoRA's small matrices forward + both gradients.
    """
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    inter = config["intermediate_size"]
    shapes = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, inter), (d, inter), (inter, d)]
    proj = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(lora_r * (i + o) for i, o in shapes)
    ctx = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)  # mean causal context of a token
    attn = layers * 2 * 2 * heads * hd * ctx
    forward = 2 * (proj + d * vocab) + attn + 2 * lora
    return forward + 2 * (proj + d * vocab) + 2 * attn + 4 * lora


# ---- runs ------------------------------------------------------------------------------------------


def run(
    cmd: list[str], what: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float, float]:
    load = os.getloadavg()[0]
    log.info("%s (load %.2f): %s", what, load, " ".join(cmd[:6]) + " ...")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, wall, load


def model_and_data() -> Path:
    """Build MODEL once; the DuIE training file both trainings read (a line naming it where it is missing)."""
    if not (MODEL / "config.json").is_file():
        from bench.bench_memory import QWEN_100M, ensure_model

        ensure_model(MODEL, QWEN_100M)
    src = DATA / "train.jsonl"
    if not src.is_file():
        raise SystemExit(f"{src}: missing; the DuIE data lives in ../shared/data/duie-mixed beside the clone")
    return src


def app_env(**extra: str) -> dict[str, str]:
    """The environment without any setting of app/config/settings.py, nor make's command line (MAKEFLAGS, whose
    names the app checks as settings: `make test-gpu REQUIRE_GPU=1`), then ``extra``: only each run's own
    command line decides."""
    from app.config import Config

    drop = {*Config.variables(), "MAKEFLAGS"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def reference_train(a: argparse.Namespace, data: Path) -> dict[str, Any]:
    res = OUT / "reference.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.reference_tutorial",
        "train",
        "--model",
        str(MODEL),
        "--data",
        str(data),
        "--out",
        str(OUT / "reference"),
        "--result",
        str(res),
        "--samples",
        str(a.samples),
        "--max-seq-len",
        "512",
        "--batch",
        "4",
        "--grad-accum",
        str(a.effective_batch // 4),
        "--epochs",
        "1",
        "--lr",
        str(a.lr),
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lora-dropout",
        "0.05",
        "--targets",
        TARGETS,
        "--seed",
        "42",
        "--threads",
        str(a.threads),
    ]
    _, wall, load = run(cmd, "reference: HF Trainer + PEFT, padded to 512, fp32")
    r = json.loads(res.read_text())
    return {**r, "wall_s": wall, "load": load}


def project_train(
    a: argparse.Namespace, data: Path, extra: list[str] | None = None, tag: str = "project"
) -> dict[str, Any]:
    out = OUT / tag
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "app",
        "train",
        f"MODEL_NAME={MODEL}",
        f"DATA_PATH={data}",
        f"OUTPUT_DIR={out}",
        f"MAX_SAMPLES={a.samples}",
        "VAL_SIZE=0",
        "MAX_SEQ_LEN=512",
        f"BATCH_SIZE={a.effective_batch}",
        "GRAD_ACCUM=1",
        "NUM_EPOCHS=1",
        f"LEARNING_RATE={a.lr}",
        "LORA_R=8",
        "LORA_ALPHA=16",
        "LORA_DROPOUT=0.05",
        f"LORA_TARGETS={TARGETS}",
        "SEED=42",
        "LOGGING_STEPS=1",
        "SAVE_STEPS=100000",
        "TIER=none",
        f"NUM_THREADS={a.threads}",
        *(extra or []),
    ]
    proc, wall, load = run(cmd, f"{tag}: python -m app train", app_env())
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "data_report.json").read_text())
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    line = next((x for x in proc.stderr.splitlines() if "packing" in x and "precision" in x), "")
    return {
        "seconds": summary["seconds"],
        "useful_tokens": report["train"]["tokens"],
        "steps": summary["steps"],
        "train_loss": summary["train_loss"],
        "losses": losses,
        "peak_rss_mb": summary["peak_rss_mb"],
        "tokens_seen": rows[-1].get("tokens_seen") if rows else None,
        "wall_s": wall,
        "load": load,
        "settings": line.split(": ", 1)[-1],
        "out": str(out),
    }


def generation(a: argparse.Namespace, adapter: str) -> dict[str, Any]:
    prompts = OUT / "prompts.jsonl"
    lines = (DATA / "dev.jsonl").read_text(encoding="utf-8").splitlines()[: a.prompts]
    atomic_write_text(prompts, "\n".join(lines) + "\n")
    res = OUT / "reference-generate.json"
    _, _, load_plain = run(
        [
            sys.executable,
            "-m",
            "bench.reference_tutorial",
            "generate",
            "--model",
            str(MODEL),
            "--data",
            str(prompts),
            "--adapter",
            adapter,
            "--result",
            str(res),
            "--prompts",
            str(a.prompts),
            "--max-new-tokens",
            str(a.new),
            "--threads",
            str(a.threads),
        ],
        "plain generate, one prompt at a time",
    )
    plain = json.loads(res.read_text())
    dest = OUT / "prompts.pred.jsonl"
    proc, _, load_proj = run(
        [
            sys.executable,
            "-m",
            "app",
            "predict",
            f"ADAPTER_DIR={adapter}",
            f"INPUT_FILE={prompts}",
            f"OUTPUT_FILE={dest}",
            f"MAX_NEW_TOKENS={a.new}",
            f"PREDICT_BATCH_SIZE={a.predict_batch}",
            f"NUM_THREADS={a.threads}",
        ],
        "project: python -m app predict INPUT_FILE=...",
        app_env(),
    )
    m = re.search(r"generated (\d+) tokens in ([\d.]+)s", proc.stderr)
    if not m:
        raise RuntimeError(f"no speed line in predict's log:\n{proc.stderr[-2000:]}")
    outputs = [json.loads(x)["output"] for x in dest.read_text(encoding="utf-8").splitlines()]
    same = sum(x == y for x, y in zip(outputs, plain["outputs"], strict=True))
    return {
        "plain": {"tokens": plain["new_tokens"], "seconds": plain["seconds"], "load": load_plain},
        "project": {"tokens": int(m.group(1)), "seconds": float(m.group(2)), "load": load_proj},
        "same_outputs": same,
        "prompts": a.prompts,
    }


# ---- profile ---------------------------------------------------------------------------------------

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
batch = collate(ft.train_rows[:cfg.train.batch_size])
batch.pop("num_tokens", None)
bf16 = precision == "bf16"
model = ft.model.train()
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
rows = [{"op": e.key, "ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in prof.key_averages()]
print("PROFILE " + json.dumps({"rows": rows, "shape": list(batch["input_ids"].shape),
                                "tokens": int((batch["labels"] != -100).numel())}))
"""


def profile_step(a: argparse.Namespace, data: Path) -> dict[str, Any]:
    values = {
        "MODEL_NAME": str(MODEL),
        "DATA_PATH": str(data),
        "OUTPUT_DIR": str(OUT / "profile"),
        "MAX_SAMPLES": a.samples,
        "VAL_SIZE": 0,
        "MAX_SEQ_LEN": 512,
        "BATCH_SIZE": a.effective_batch,
        "GRAD_ACCUM": 1,
        "LORA_R": 8,
        "LORA_ALPHA": 16,
        "LORA_DROPOUT": 0.05,
        "LORA_TARGETS": TARGETS,
        "TIER": "none",
        "NUM_THREADS": a.threads,
        "SEED": 42,
    }
    proc, _, _ = run(
        [sys.executable, "-c", PROFILE, json.dumps(values)], "profile: one project training step", app_env()
    )
    prof = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PROFILE "))[8:])
    rows = sorted(prof["rows"], key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    groups: dict[str, float] = {}
    for r in rows:
        groups[category(r["op"])] = groups.get(category(r["op"]), 0) + r["ms"]
    return {"total_ms": total, "top": rows[:12], "groups": groups, "shape": prof["shape"]}


def category(op: str) -> str:
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "matmul"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention (SDPA)"
    if op in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"):
        return "copies / dtype casts"
    if op in ("aten::bernoulli_", "aten::native_dropout", "aten::dropout", "aten::random_"):
        return "dropout"
    if "softmax" in op or "nll_loss" in op or "cross_entropy" in op:
        return "loss (log-softmax, NLL)"
    return "other elementwise / reductions"


# ---- report ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--predict-batch", type=int, default=8)
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=1200, help="seconds to wait for that at most")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--notes", default="", help="a paragraph appended to the report")
    a = ap.parse_args()
    setup_logging()
    a.threads = a.threads or usable_cpus()
    OUT.mkdir(parents=True, exist_ok=True)
    src = model_and_data()
    data = OUT / "train200.jsonl"
    atomic_write_text(data, "\n".join(src.read_text(encoding="utf-8").splitlines()[: a.samples]) + "\n")

    start_load = wait_for_quiet(a.max_load, a.max_wait)
    t0 = time.time()
    before = peaks(a.threads)
    log.info("matmul GFLOP/s before: %s", before)
    ref = reference_train(a, data)
    proj = project_train(a, data)
    gen = generation(a, proj["out"])
    after = peaks(a.threads)
    log.info("matmul GFLOP/s after: %s", after)
    prof = None if a.skip_profile else profile_step(a, data)
    if not a.skip_profile:
        from bench.profile_4bit import profile_4bit
    prof4 = None if a.skip_profile else profile_4bit(data, 148, a.threads, run, app_env())
    config = json.loads((MODEL / "config.json").read_text())
    from transformers import AutoTokenizer

    lengths = json.loads((Path(proj["out"]) / "data_report.json").read_text())["train"]
    result = {
        "machine": machine(a.threads),
        "start_load": round(start_load, 2),
        "minutes": round((time.time() - t0) / 60, 1),
        "matmul_before": before,
        "matmul_after": after,
        "reference": ref,
        "project": proj,
        "generation": gen,
        "profile": prof,
        "profile_4bit": prof4,
        "args": vars(a),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "flops_per_token": train_flops_per_token(config, sample_lengths(data, AutoTokenizer.from_pretrained(MODEL)), 8),
        "data_report": lengths,
    }
    write_json(Path("bench/results.json"), result)
    text = report(result) + (f"\n{a.notes}\n" if a.notes else "")
    atomic_write_text(Path("bench/results.md"), text)
    sys.stdout.write(text)  # cli-output
    return 0


def sample_lengths(data: Path, tok: Any) -> list[int]:
    """Token count of every sample, as both trainings tokenize it (chat template, answer, EOS; cut at 512)."""
    out = []
    for line in data.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        p = tok.apply_chat_template(
            [{"role": "user", "content": rec["context"]}], tokenize=False, add_generation_prompt=True
        )
        n = (
            len(tok(p, add_special_tokens=False)["input_ids"])
            + len(tok(rec["target"], add_special_tokens=False)["input_ids"])
            + 1
        )
        out.append(min(n, 512))
    return out


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    from app.models.quantization import bf16_supported

    return {
        "cpu": cpu,
        "cores": usable_cpus(),
        "threads": threads,
        "bf16_cpu": bf16_supported(False),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def report(r: dict[str, Any]) -> str:
    ref, proj, gen, fpt = r["reference"], r["project"], r["generation"], r["flops_per_token"]
    peak32 = max(r["matmul_before"]["fp32"], r["matmul_after"]["fp32"])
    peak16 = max(r["matmul_before"]["bf16"], r["matmul_after"]["bf16"])

    def tps(x: dict) -> float:
        return x["useful_tokens"] / x["seconds"]

    def last5(x: dict) -> float:
        tail = x["losses"][-5:]
        return sum(tail) / len(tail)

    speedup = tps(proj) / tps(ref)
    mfu = {k: tps(x) * fpt / 1e9 for k, x in (("ref", ref), ("proj", proj))}
    dloss = abs(proj["train_loss"] - ref["train_loss"]) / ref["train_loss"] * 100
    dlast = abs(last5(proj) - last5(ref)) / last5(ref) * 100
    g_plain = gen["plain"]["tokens"] / gen["plain"]["seconds"]
    g_proj = gen["project"]["tokens"] / gen["project"]["seconds"]
    m = r["machine"]
    lines = [
        "# Training speed: the tutorial way vs `python -m app train`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} usable cores, {m['threads']} threads, AVX512-BF16/AMX "
        f"{'yes' if m['bf16_cpu'] else 'no'}; torch {m['torch']}. Run by `make bench` "
        f"(python -m bench.bench_speed) in {r['minutes']} minutes.",
        f"Load average (1 min): {r['start_load']} when it started, {ref['load']} / {proj['load']} as each training "
        f"started, {r['loadavg_end'][0]} at the end (1/5/15 min: {', '.join(map(str, r['loadavg_end']))}). "
        f"Above ~0.5 other jobs shared the {m['cores']} cores and every speed below is understated.",
        "",
        f"Both: models/bench-qwen2-100m (random Qwen2, hidden 768, 12 layers, vocab 32k, ~125M parameters), the "
        f"first {r['args']['samples']} samples of ../shared/data/duie-mixed/train.jsonl "
        f"({ref['useful_tokens']:,} tokens with the chat template; 1 cut at 512), LoRA r=8 alpha=16 dropout 0.05 on "
        f"q/k/v/o/gate/up/down, 1 epoch, effective batch {r['args']['effective_batch']}, LR {r['args']['lr']} cosine "
        "with 5% warmup, seed 42.",
        f"- reference (bench/reference_tutorial.py): HF Trainer + PEFT, every sample padded to 512, fp32, micro-batch "
        f"4 x {r['args']['effective_batch'] // 4} accumulation.",
        f"- project: `python -m app train` with its defaults for this model ({proj['settings']}), micro-batch "
        f"{r['args']['effective_batch']}.",
        "",
        "| | reference | project | ratio |",
        "|---|---|---|---|",
        f"| wall time, training loop (s) | {ref['seconds']:.1f} | {proj['seconds']:.1f} | "
        f"{ref['seconds'] / proj['seconds']:.2f}x faster |",
        f"| wall time, whole process (s) | {ref['wall_s']:.1f} | {proj['wall_s']:.1f} | |",
        f"| tokens processed (with padding) | {ref['padded_tokens']:,} | {proj['useful_tokens']:,} + row tails | |",
        f"| useful (non-pad) tokens/s | {tps(ref):.1f} | {tps(proj):.1f} | **{speedup:.2f}x** |",
        f"| peak RSS (MB) | {ref['peak_rss_mb']:,.0f} | {proj['peak_rss_mb']:,.0f} | "
        f"{proj['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |",
        f"| final train loss (epoch mean) | {ref['train_loss']:.4f} | {proj['train_loss']:.4f} | {dloss:.2f}% apart |",
        f"| mean loss of the last 5 steps | {last5(ref):.4f} | {last5(proj):.4f} | {dlast:.2f}% apart |",
        f"| model GFLOP/s (LoRA training, {fpt / 1e6:.0f} MFLOP per useful token) | {mfu['ref']:.1f} | "
        f"{mfu['proj']:.1f} | |",
        f"| MFU vs fp32 matmul peak ({peak32:.0f} GFLOP/s) | {100 * mfu['ref'] / peak32:.1f}% | "
        f"{100 * mfu['proj'] / peak32:.1f}% | |",
        f"| MFU vs bf16 matmul peak ({peak16:.0f} GFLOP/s) | {100 * mfu['ref'] / peak16:.1f}% | "
        f"{100 * mfu['proj'] / peak16:.1f}% | |",
        f"| generation tokens/s ({gen['prompts']} prompts x {r['args']['new']} new, greedy) | {g_plain:.1f} (plain "
        f"`generate`, one prompt at a time) | {g_proj:.1f} (file mode, batch {r['args']['predict_batch']}) | "
        f"{g_proj / g_plain:.2f}x |",
        "",
        f"torch.matmul peak, measured in this run (best of tokens x 768 x 2048, 2048^3): fp32 "
        f"{r['matmul_before']['fp32']} / {r['matmul_after']['fp32']} GFLOP/s, bf16 {r['matmul_before']['bf16']} / "
        f"{r['matmul_after']['bf16']} GFLOP/s (before / after the runs). Model FLOPs count the work one LoRA token "
        "needs (forward; input gradients of the frozen weights; attention over its own causal context; LoRA), "
        "not padding, not logits skipped on prompt tokens. Generation: the same adapter and the first "
        f"{gen['prompts']} dev prompts; identical greedy outputs for {gen['same_outputs']} of {gen['prompts']}.",
        "",
        "## Targets",
        "",
    ]
    lines.append(f"- useful tokens/s >= 3x the reference: {speedup:.2f}x -> {'PASS' if speedup >= 3 else 'FAIL'}")
    ok = proj["peak_rss_mb"] <= ref["peak_rss_mb"]
    lines.append(
        f"- peak RSS <= the reference's: {proj['peak_rss_mb']:,.0f} vs {ref['peak_rss_mb']:,.0f} MB -> "
        f"{'PASS' if ok else 'FAIL'}"
    )
    lines.append(
        f"- final loss within 2% of the reference: epoch mean {dloss:.2f}% apart, last 5 steps {dlast:.2f}% "
        f"-> {'PASS' if dloss <= 2 else 'FAIL'}"
    )
    frac = mfu["proj"] / peak16
    lines.append(
        f"- training step at >= 60% of the bf16 matmul peak: {100 * frac:.1f}% -> {'PASS' if frac >= 0.6 else 'FAIL'}"
    )
    if r.get("profile"):
        p = r["profile"]
        lines += [
            "",
            f"## Where a project training step goes (torch.profiler, micro-batch of "
            f"{r['args']['effective_batch']} samples packed into {p['shape'][0]} rows x {p['shape'][1]})",
            "",
            "| category | ms | share |",
            "|---|---|---|",
        ]
        for k, v in sorted(p["groups"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:,.0f} | {100 * v / p['total_ms']:.0f}% |")
        lines += ["", "| op (self CPU time) | ms | calls |", "|---|---|---|"]
        lines += [f"| `{x['op']}` | {x['ms']:,.0f} | {x['calls']} |" for x in p["top"]]
        share = p["groups"].get("matmul", 0.0) / p["total_ms"]
        reach = frac / share if share else 0.0  # the step's MFU if only its matmuls took time
        need = (frac / 0.6 - share) / (1 - share) if reach >= 0.6 else None
        lines += [
            "",
            f"What bounds it: the matmuls are {100 * share:.0f}% of the step and run at about {100 * reach:.0f}% "
            "of the bf16 peak on their own (the model's 768-wide projections, a LoRA rank of 8), so the step "
            f"would be at {100 * reach:.0f}% if everything else took no time"
            + (
                f"; 60% needs the rest cut to {100 * need:.0f}% of its time."
                if need is not None
                else ": 60% is out of reach by cutting the rest alone."
            ),
        ]
    if r.get("profile_4bit"):
        from bench.profile_4bit import section

        lines += section(r["profile_4bit"], peak16)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
