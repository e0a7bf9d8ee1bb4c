"""ONNX Runtime vs PyTorch generation speed on the ~100M random models.

For a ~100M-parameter random Qwen2 (the memory benchmark's model) and a GLM of the same shape:
export to ONNX with `app.inference.export` (bench/results/onnx/, ignored by git), then generate the same
NEW greedy tokens (stop tokens off, so every run makes exactly NEW) from the chat-templated
built-in triplet prompt, batch 1, KV cache on both sides, same thread count: PyTorch
``model.generate`` vs ``app.inference.onnx_model.OnnxCausalLM.generate``. One warm-up run each is dropped, then
REPEATS runs alternate between the engines so that a disturbance hits both. Reported: median
end-to-end tokens/s (with min-max), time to first token (prefill), decode tokens/s after it,
whether both produced the same tokens, and the machine with its load average during the runs.
Run `make bench-onnx` (python -m bench.bench_onnx); writes bench/onnx.md and bench/onnx.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.core.atomic import atomic_write_text, write_json
from app.core.utils import setup_logging, usable_cpus
from app.models.tiny import build_tiny_model
from bench.bench_memory import QWEN_100M

log = logging.getLogger("bench")
MODELS = {
    "qwen2-100m": ("tiny-qwen2", Path("models/bench-qwen2-100m")),
    "glm-100m": ("tiny", Path("models/bench-glm-100m")),
}
EXPORTS = Path("bench/results/onnx")


class Clock:
    """A generate() streamer that only notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls, self.first = 0, 0.0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def timed(gen: Callable[[Clock], Any], n_prompt: int, new: int) -> dict[str, Any]:
    clock, load = Clock(), os.getloadavg()[0]
    start = time.perf_counter()
    out = gen(clock)
    end = time.perf_counter()
    tokens = out[0, n_prompt:].tolist()
    assert len(tokens) == new, f"generated {len(tokens)} tokens, expected {new}"
    return {
        "tok_s": new / (end - start),
        "ttft_ms": 1000 * (clock.first - start),
        "decode_tok_s": (new - 1) / (end - clock.first),
        "load": load,
        "tokens": tokens,
    }


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Other work on the machine skews both engines (PyTorch more); wait until the load settles.
    Returns the 1-minute load average the runs started at."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        log.info("load average %.2f > %.2f: waiting for the machine to settle", os.getloadavg()[0], max_load)
        time.sleep(20)
    return os.getloadavg()[0]


def bench_model(
    label: str,
    family: str,
    path: Path,
    new: int,
    repeats: int,
    threads: int,
    quiet: tuple[float, float] = (float("inf"), 0.0),
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.data.encode import prompt_text
    from app.inference.export import export_model
    from app.inference.onnx_model import OnnxCausalLM
    from app.inference.predict import BUILTIN_PROMPT
    from app.models.artifacts import is_onnx_dir

    if not (path / "config.json").is_file():
        build_tiny_model(family, path, dims=QWEN_100M, vocab_size=32000)
    onnx_dir = EXPORTS / label
    export_s = None
    if not is_onnx_dir(onnx_dir):
        t = time.perf_counter()
        export_model(path, onnx_dir)
        export_s = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(
        prompt_text(tok, [{"role": "user", "content": BUILTIN_PROMPT}]), return_tensors="pt", add_special_tokens=False
    )
    n_prompt = enc["input_ids"].shape[1]
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ort = OnnxCausalLM(onnx_dir, threads)
    params = sum(p.numel() for p in model.parameters())
    kw = dict(max_new_tokens=new, do_sample=False, eos_token_id=[], pad_token_id=tok.pad_token_id)

    def pytorch(clock: Clock) -> Any:
        with torch.inference_mode():
            return model.generate(**enc, streamer=clock, **kw)

    engines = {"PyTorch": pytorch, "ONNX Runtime": lambda clock: ort.generate(**enc, streamer=clock, **kw)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    start_load = wait_for_quiet(*quiet)
    for gen in engines.values():
        timed(gen, n_prompt, new)  # warm-up: first-call allocations, ORT's lazy kernel setup
    for r in range(repeats):
        for name, gen in engines.items():
            runs[name].append(timed(gen, n_prompt, new))
            log.info(
                "%s %s run %d: %.1f tokens/s (load %.2f)",
                label,
                name,
                r + 1,
                runs[name][-1]["tok_s"],
                runs[name][-1]["load"],
            )
    same = runs["PyTorch"][0]["tokens"] == runs["ONNX Runtime"][0]["tokens"]
    med = {
        name: {k: statistics.median(x[k] for x in rs) for k in ("tok_s", "ttft_ms", "decode_tok_s")}
        | {
            "min": min(x["tok_s"] for x in rs),
            "max": max(x["tok_s"] for x in rs),
            "loads": [round(x["load"], 2) for x in rs],
            "runs_tok_s": [round(x["tok_s"], 2) for x in rs],
        }
        for name, rs in runs.items()
    }
    return {
        "model": label,
        "path": str(path),
        "params_m": params / 1e6,
        "prompt_tokens": n_prompt,
        "new_tokens": new,
        "export_s": export_s,
        "start_load": round(start_load, 2),
        "same_tokens": same,
        "engines": med,
        "speedup": med["ONNX Runtime"]["tok_s"] / med["PyTorch"]["tok_s"],
    }


def machine(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "usable_cpus": usable_cpus(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def report(results: list[dict[str, Any]], env: dict[str, Any], repeats: int) -> str:
    lines = [
        "# ONNX Runtime vs PyTorch: generation speed",
        "",
        f"`make bench-onnx` ({env['date']}). Machine: {env['cpu']}, {env['usable_cpus']} usable cores, "
        f"{env['threads']} threads for both engines; torch {env['torch']}, transformers "
        f"{env['transformers']}, onnxruntime {env['onnxruntime']}, Python {env['python']}.",
        "",
        "Random-weight models (fp32) exported by `app/inference/export.py` (`torch.onnx.export(dynamo=True)`, one "
        "decoder graph with KV-cache inputs/outputs). Batch 1, greedy, KV cache on both sides, stop tokens "
        f"off; median of {repeats} runs after a warm-up, alternating engines (min-max in brackets). "
        "tokens/s = new tokens / wall time of the whole generate call, prefill included.",
        "",
        "Load average: the 1-minute figure when each measurement started; it includes the benchmark's own "
        f"{env['threads']} threads, so about 1-2 with nothing else running. Runs of a model began only once "
        "it was below "
        + str(env["max_load"])
        + " ("
        + ", ".join(f"{r['model']}: {r['start_load']}" for r in results)
        + ").",
        "",
        "| model | engine | prompt + new tokens | tokens/s | first token ms | decode tokens/s | speedup | "
        "same tokens | load avg during runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["engines"].items():
            onnx = name == "ONNX Runtime"
            speedup = f"**{r['speedup']:.2f}x**" if onnx else "1.00x"
            same = ("yes" if r["same_tokens"] else "no") if onnx else ""
            loads = ", ".join(str(x) for x in m["loads"])
            lines.append(
                f"| {r['model']} ({r['params_m']:.0f}M) | {name} | {r['prompt_tokens']} + {r['new_tokens']} "
                f"| **{m['tok_s']:.1f}** ({m['min']:.1f}-{m['max']:.1f}) | {m['ttft_ms']:.0f} "
                f"| {m['decode_tok_s']:.1f} | {speedup} | {same} | {loads} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=128, help="new tokens per generate call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=300, help="seconds to wait for that at most")
    ap.add_argument("--notes", default="", help="a paragraph appended to the report (e.g. the machine's state)")
    a = ap.parse_args()
    setup_logging()
    threads = a.threads or usable_cpus()
    results = [
        bench_model(label, *MODELS[label], a.new, a.repeats, threads, (a.max_load, a.max_wait))
        for label in a.models.split(",")
    ]
    env = machine(threads) | {"max_load": a.max_load}
    text = report(results, env, a.repeats) + (f"\n{a.notes}\n" if a.notes else "")
    atomic_write_text(Path("bench/onnx.md"), text)
    write_json(Path("bench/onnx.json"), {"machine": env, "results": results})
    log.info("wrote bench/onnx.md\n%s", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
