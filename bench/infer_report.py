"""bench/infer.md from bench/infer.json (`make bench-infer`, bench/bench_infer.py): the tables and the targets."""

from __future__ import annotations

import functools
import platform
import re
import time
from pathlib import Path
from typing import Any

from app.core.atomic import atomic_write_text
from app.core.utils import usable_cpus
from bench import infer_eval

NAMES = {
    "torch-bf16": "torch bf16 (`load_model(bf16=True)`)",
    "torch-4bit": "torch bnb 4-bit (`load_base(.., '4bit')`)",
    "torch-8bit": "torch bnb 8-bit (`load_base(.., '8bit')`)",
    "torch-fp32": "torch fp32 (`load_base(.., 'none')`: predict at QUANT_LEVEL=none)",
    "f16": "llama.cpp f16",
    "q8_0": "llama.cpp q8_0",
    "q4_k_m": "llama.cpp q4_k_m",
}
BUSY = 2.5  # the 1-minute load average with only this benchmark's 2 threads running is about 2


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    from importlib import metadata

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "bitsandbytes", "llama-cpp-python")}
    return {"cpu": cpu, "usable_cpus": usable_cpus(), "date": time.strftime("%Y-%m-%d %H:%M"), **versions}


def log_facts(text: str) -> dict:
    """From evaluate's log: its key lines, the token budget, the seconds its generate bar took, the error line."""
    lines = text.replace("\r", "\n").splitlines()
    out: dict[str, Any] = {
        "log_lines": [
            ln[9:]
            for ln in lines
            if any(
                w in ln for w in ("tokens/s", "generating at most", "F1", "llama.cpp", "model ", "expected evaluate")
            )
        ][:14]
    }
    if m := re.search(r"generated (\d+) new tokens for", text):
        out["new_tokens"] = int(m.group(1))
    if m := re.search(r"generating at most (\d+) new tokens", text):
        out["budget"] = int(m.group(1))
    if m := re.findall(r"generate: 100%.*?\[(\d+):(\d+)<", text.replace("\r", "\n")):
        out["generate_s"] = sum(int(a) * 60 + int(b) for a, b in m)
    if errors := [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln)]:
        out["error"] = errors[-1][:300]
    return out


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _loads(r: dict) -> str:
    la = r.get("load_avg") or [None, None]
    return f"{_f(la[0], '{:.2f}')} / {_f(la[1], '{:.2f}')}"


def _single_table(results: dict, size: str) -> list[str]:
    lines = [
        "| engine | prefill tok/s (256) | decode tok/s | new tokens | peak RSS MB | load s | cgroup | "
        "load avg before / after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, name in NAMES.items():
        r = results.get(f"{size}/single/{b}")
        if r is None:
            lines.append(f"| {name} | not measured | | | | | | |")
        elif "failed" in r or r.get("rc"):
            lines.append(
                f"| {name} | failed (exit {r.get('rc')}) | | | {_f(r.get('process_peak_rss_mb'), '{:,}')} | | "
                f"{r.get('cgroup_mb', '-')} | {_loads(r)} |"
            )
        else:
            cg = (
                f"{r['cgroup_mb']:,} MB (peak {r.get('cgroup_peak_mb')}, OOM kills {r.get('oom_kills')})"
                if r.get("cgroup_mb")
                else "-"
            )
            lines.append(
                f"| {name} | {r['prefill_tok_s']:.1f} | **{r['decode_tok_s']:.2f}** | {r['new_tokens']} | "
                f"{r['peak_rss_mb']:,} | {r['load_s']} | {cg} | {_loads(r)} |"
            )
    return lines


def _get(results: dict, key: str, field: str) -> float | None:
    r = results.get(key) or {}
    return None if "failed" in r or r.get("rc") else r.get(field)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "PASS" if ok else "FAIL"


def targets(results: dict) -> list[str]:
    out = []

    def s(size: str, backend: str, field: str) -> float | None:  # one stream's figure
        return _get(results, f"{size}/single/{backend}", field)

    q4, t4, bf = (s("1.5b", b, "decode_tok_s") for b in ("q4_k_m", "torch-4bit", "torch-bf16"))
    rq4, rt4, rbf = (s("1.5b", b, "peak_rss_mb") for b in ("q4_k_m", "torch-4bit", "torch-bf16"))
    if None not in (q4, t4, bf, rq4, rt4, rbf):
        ok = q4 >= 2 * t4 and q4 >= 4 * bf and rq4 <= 0.5 * min(rt4, rbf)
        out.append(
            f"- 1.5B: llama.cpp q4_k_m decodes {q4:.2f} tok/s = {q4 / t4:.2f}x torch 4-bit ({t4:.2f}; target "
            f">= 2x) and {q4 / bf:.2f}x torch bf16 ({bf:.2f}; target >= 4x), at {rq4:,} MB peak RSS = "
            f"{rq4 / rt4:.0%} of torch 4-bit's {rt4:,} and {rq4 / rbf:.0%} of bf16's {rbf:,} (target <= 50%) "
            f"-> {_verdict(ok)}"
        )
    else:
        out.append("- 1.5B: q4_k_m decode >= 2x torch 4-bit, >= 4x bf16, <= half the RSS -> not measured")
    q6, t6 = s("6b", "q4_k_m", "decode_tok_s"), s("6b", "torch-4bit", "decode_tok_s")
    if q6 is not None and t6 is not None:
        scale = 8 / 34.4
        out.append(
            f"- 6B in an {results['6b/single/q4_k_m'].get('cgroup_mb', 0):,} MB cgroup: llama.cpp q4_k_m "
            f"decodes {q6:.2f} tok/s = {q6 / t6:.1f}x torch 4-bit's {t6:.2f} (what predict runs today; "
            f"bench/scale.md's predict-custom made 8 tokens in 34.4 s = {scale:.2f} tok/s end to end, "
            f"{q6 / scale:.1f}x) (target >= 5x) -> {_verdict(q6 >= 5 * t6)}"
        )
    else:
        out.append("- 6B in 8 GB: q4_k_m >= 5x predict's tokens/s -> not measured")
    return out + infer_eval.targets(results, _verdict)


def torch_wins(results: dict) -> list[str]:
    out = []
    for size in ("1.5b", "6b"):
        pre = {b: _get(results, f"{size}/single/{b}", "prefill_tok_s") for b in NAMES}
        pre = {b: v for b, v in pre.items() if v is not None}
        if pre:
            best = max(pre, key=pre.get)
            out.append(
                f"- prefill at {size.upper()}: "
                + ", ".join(f"{b} {v:.1f}" for b, v in pre.items())
                + f" tok/s; fastest: {best}"
            )
    bt = {b: _get(results, f"1.5b/batch/{b}", "tok_s") for b in ("torch-bf16", "torch-4bit", "q8_0", "q4_k_m")}
    if any(v is not None for v in bt.values()):
        out.append(
            "- 8 concurrent requests at 1.5B (total new tok/s): "
            + ", ".join(f"{b} {v:.1f}" for b, v in bt.items() if v is not None)
        )
    return out


def _batch_table(results: dict) -> list[str]:
    lines = [
        "| engine | new tokens | seconds | total tok/s | peak RSS MB | load avg before / after |",
        "|---|---|---|---|---|---|",
    ]
    for b in ("torch-bf16", "torch-4bit", "q8_0", "q4_k_m"):
        r = results.get(f"1.5b/batch/{b}")
        if r and "tok_s" in r:
            lines.append(
                f"| {NAMES[b]} | {r['new_tokens']} | {r['seconds']} | **{r['tok_s']:.1f}** | "
                f"{r['peak_rss_mb']:,} | {_loads(r)} |"
            )
        elif r:
            lines.append(f"| {NAMES[b]} | failed (exit {r.get('rc')}) | | | | {_loads(r)} |")
    return lines


def _busy(results: dict) -> str:
    busy = sorted(
        k
        for k, r in results.items()
        if isinstance(r, dict) and max((x for x in (r.get("load_avg") or []) if x is not None), default=0) > BUSY
    )
    if not busy:
        return f"The load average stayed at or below {BUSY:.1f}: nothing else ran on the cores."
    return (
        f"**Load average above {BUSY}** (this benchmark's 2 threads make ~2): other work shared the 2 cores "
        f"during {', '.join(busy)}. Those numbers are understated, each by how busy the cores were at its time "
        "(see each row's load), so the ratios between engines are skewed too: rerun "
        "`python -m bench.bench_infer --fresh` on a quiet machine before reading them as the engines' own."
    )


def write_report(results: dict, notes: str = "", path: Path = Path("bench/infer.md")) -> str:
    m = machine()
    conv = ", ".join(
        f"{k.split('/')[0]} {k.split('/')[2]} {r['seconds']:.0f} s ({r['bytes'] / 2**30:.2f} GiB)"
        for k, r in results.items()
        if "/convert/" in k
    )
    lines = [
        "# Inference engines on 2 CPU cores: torch vs llama.cpp",
        "",
        f"`make bench-infer` (python -m bench.bench_infer; {m['date']}). Machine: {m['cpu']}, {m['usable_cpus']} "
        f"usable cores, 2 threads for every engine; torch {m['torch']}, transformers {m['transformers']}, "
        f"bitsandbytes {m['bitsandbytes']}, llama-cpp-python {m['llama-cpp-python']} (built without AMX).",
        "",
        "Models: random bf16 GLMs (transformers' GlmForCausalLM, the tiny GLM's tokenizer) in GLM-Edge-1.5B-chat's "
        "shape (hidden 2048, 28 layers, 16 heads, 4 KV heads, head_dim 128, ffn 6144, vocab 59,264: 1.59B "
        "parameters; the hub is not reachable here, so these are the dims as known, not read from its config) and "
        "ChatGLM3-6B's (bench/scale_models.py: hidden 4096, 28 layers, 32 heads, 2 KV groups, ffn 13,696, vocab "
        "65,024). GGUFs by llama.cpp's own converter (f16, + metadata check) and quantizer: "
        + (conv or "none yet")
        + ".",
        "",
        "Each engine runs in its own process, so its peak RSS (VmHWM) is its own; for llama.cpp it includes the "
        "GGUF's memory-mapped pages. Single stream: a 256-token prompt, then 128 greedy new tokens with the stop "
        "tokens off, through the engine's generate() as predict calls it, after a 2-token warm-up; prefill tok/s = "
        "256 / time to the first new token, decode tok/s = the other new tokens / their time. llama.cpp f16 runs "
        "as Predictor loads it (f32 KV cache, no flash attention); q8_0 / q4_k_m with llama.cpp's defaults. "
        "Note: predict with QUANT_LEVEL=none loads fp32, not bf16 (`load_base`); the bf16 row is "
        "`load_model(bf16=True)`. "
        "Where llama.cpp's RSS goes (1.5B q4_k_m, read from its load log): the mapped file (918.8 MiB) and, for the "
        "tensors its CPU backend repacks to q4_K_8x8, a second copy (CPU_REPACK, 622.1 MiB): 1,613 MB after the load "
        "with or without mmap; importing torch and the tokenizer adds ~260 MB to every engine's process.",
        "",
        _busy(results),
        "",
        "## 1.5B (GLM-Edge shape), one stream",
        "",
        *_single_table(results, "1.5b"),
        "",
        "## 6B (ChatGLM3 shape), one stream",
        "",
        "The 4-bit engines run inside an 8,000 MB memory cgroup (the user's PC); bf16, f16 and q8_0 do not fit "
        "one. torch decodes fewer tokens here (seconds each: the new tokens column), llama.cpp 128.",
        "",
        *_single_table(results, "6b"),
        "",
        "## 8 concurrent requests at 1.5B",
        "",
        "`app.inference.generate.generate_batch` (what evaluate, predict-file and F1 use; serve batches the same "
        "way): 8 synthetic prompts, left-padded, KV-cached, the same budget each (new tokens / 8); for llama.cpp "
        "the 8 rows are 8 "
        "sequences of one unified KV cache decoded together. Total new tokens / wall time.",
        "",
        *_batch_table(results),
        "",
        "## The evaluate time model's engine shares (app/evaluation/eval_timing.py)",
        "",
        *infer_eval.calibration_table(results),
        "",
        "## `make evaluate`: wall time, and `make info`'s prediction of it",
        "",
        "In a temp project dir, as a user types them: `python -m app info` with the evaluate's settings (its "
        '"expected evaluate" line, made before anything is exported or loaded: app/evaluation/eval_timing.py), then '
        "for llama.cpp `export-gguf`, then `python -m app evaluate ADAPTER_DIR=none MODEL_NAME=<the random model> "
        "EVAL_PATH=<N synthetic triplet records> NUM_THREADS=2`, wall time of the whole process. torch at "
        "QUANT_LEVEL=4bit: what the tier picks below 12 GB of RAM (the user's 8 GB PC) and what predict runs a "
        "QLoRA run on. The random models answer garbage that runs to evaluate's budget (the longest reference "
        "answer + 25%) unless a stop token comes first: `make info`'s budget figure is the one that applies "
        "(a trained model's answers end where the references do: its first figure). At 6B, evaluate runs inside "
        "the 8,000 MB cgroup.",
        "",
        *infer_eval.eval_table(results),
        "",
        "## The demo's trained model: F1 per backend",
        "",
        "`make demo`'s model (models/demo, a 0.9M-parameter GLM trained from scratch, METHOD=full) on its held-out "
        "records (data/demo/heldout.jsonl, subjects never seen in training), `python -m app evaluate` per backend, "
        "PREDICT_BATCH_SIZE=32; llama.cpp through a GGUF that `export-gguf` wrote at each GGUF_QUANT.",
        "",
        *infer_eval.demo_table(results),
        "",
        "## Targets",
        "",
        *targets(results),
        "",
        "## Where torch still wins",
        "",
        *(torch_wins(results) or ["- not measured yet"]),
        "",
        *(["## Notes", "", notes, ""] if notes else []),
    ]
    text = "\n".join(lines)
    atomic_write_text(path, text)
    return text
