"""Inference engines on 2 CPU cores: torch (bf16, bitsandbytes 4-bit) vs llama.cpp (f16, q8_0, q4_k_m GGUF).

`make bench-infer` (python -m bench.bench_infer). Random GLMs in GLM-Edge-1.5B's shape (GLM_EDGE_1_5B below)
and ChatGLM3-6B's (bench/scale_models.py), bf16 on disk, in a scratch dir outside the checkout (--scratch).
llama.cpp's converter, metadata check and quantizer (app.inference.llamacpp) make the GGUFs from them.
Every measurement is its own child process (`--child`), so its peak RSS (VmHWM) is that engine's alone:
- single: prefill tokens/s (a 256-token prompt, from the time to the first new token) and decode tokens/s
  (128 new tokens, stop tokens off) through each engine's generate(), as predict calls it;
- batch: app.inference.generate.generate_batch of 8 prompts (serve's and evaluate's left-padded batch; for
  llama.cpp 8 sequences of one KV cache), total new tokens/s;
- evaluate: `make info`'s prediction, then `python -m app evaluate` on 100 synthetic dev records (16 at 6B,
  llama.cpp in the 8 GB cgroup) in a temp project dir, wall time; and `make demo`'s model's F1 per backend
  (bench/infer_eval.py);
- 6B in an 8 GB memory cgroup (app.core.cgroups, the user's PC): torch 4-bit (what predict runs today)
  and llama.cpp q4_k_m.
Each result goes to bench/infer.json as it completes, skipped when there (--fresh); bench/infer_report.py: .md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.core import cgroups
from app.core.atomic import write_json
from app.core.utils import setup_logging, usable_cpus
from bench import infer_eval
from bench.infer_report import log_facts, machine, write_report
from bench.scale_models import SHAPES, build_random_glm

log = logging.getLogger("bench")
# THUDM/glm-edge-1.5b-chat's GlmConfig dims (the hub is not reachable here; these give 1.59B parameters).
GLM_EDGE_1_5B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=8192,
    vocab_size=59264,
)
SHAPES.setdefault("glm-edge-1.5b", GLM_EDGE_1_5B)
MODELS = {"1.5b": "glm-edge-1.5b", "6b": "chatglm3-6b"}
BACKENDS = ("torch-bf16", "torch-4bit", "f16", "q8_0", "q4_k_m")
MORE_BACKENDS = ("torch-8bit", "torch-fp32")  # what predict loads at QUANT_LEVEL=8bit / none: on request
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 1.07, "q4_k_m": 0.61}
PROMPT, NEW, BATCH, EVAL_N, EVAL_N_6B, CGROUP_MB = 256, 128, 8, 100, 16, 8000
STEPS_PROMPT, STEPS_NEW = 64, 32  # the "steps" kind: 8 rows decoded together, for app/evaluation/eval_timing.py
NEW_6B_TORCH = 16  # torch at 6B decodes seconds per token here: 16 tokens say its rate
RESULTS = Path("bench/infer.json")


# ---- child: one engine, one measurement ----------------------------------------------------------------
def _engine(backend: str, model_dir: str, gguf: str, threads: int, n_seq: int) -> Any:
    if backend.startswith("torch"):
        import torch

        from app.inference.predict import load_base
        from app.models.loading import load_model

        torch.set_num_threads(threads)
        quant = {"torch-4bit": "4bit", "torch-8bit": "8bit", "torch-fp32": "none"}.get(backend)
        model = load_base(model_dir, quant) if quant else load_model(model_dir, bf16=True)
        return model.eval()
    from app.inference.llamacpp_model import LlamaCppCausalLM

    # as Predictor loads it: a 16-bit GGUF with an f32 KV cache and no flash attention
    return LlamaCppCausalLM(gguf, threads, n_seq=n_seq, seq_ctx=512, exact=backend == "f16")


class Clock:
    """A generate() streamer that notes when the first new token arrives (its first call is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, 0.0

    def put(self, value: Any) -> None:
        self.calls += 1
        self.first = time.perf_counter() if self.calls == 2 else self.first

    def end(self) -> None:
        pass


def _timed(model: Any, tok: Any, rows: int, prompt: int, new: int) -> tuple[int, float, float]:
    """generate() on ``rows`` copies of a ``prompt``-token prompt with the stop tokens off, after a warm-up:
    (new tokens per row, seconds to the first new token, seconds of the other new tokens)."""
    import torch

    from app.inference.predict import BUILTIN_PROMPT

    ids = tok(BUILTIN_PROMPT * 8, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(ids * (prompt // len(ids) + 1))[:prompt]] * rows)
    kw = dict(do_sample=False, eos_token_id=[], pad_token_id=tok.pad_token_id, use_cache=True)
    with torch.inference_mode():
        # warm-up: first-call allocations, the GGUF's pages read in
        model.generate(input_ids=ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=2, **kw)
        clock, start = Clock(), time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, streamer=clock, **kw
        )
        end = time.perf_counter()
    return out.shape[1] - prompt, clock.first - start, end - clock.first


def child(spec: dict) -> dict:
    from app.core.utils import peak_rss_mb
    from app.models.loading import load_tokenizer

    tok = load_tokenizer(spec["model"])
    t0 = time.perf_counter()
    model = _engine(
        spec["backend"],
        spec["model"],
        spec.get("gguf", ""),
        spec["threads"],
        BATCH if spec["kind"] in ("batch", "steps") else 1,
    )
    row: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1)}
    if spec["kind"] == "probe":  # the rates app/evaluation/eval_timing.py scales its engine shares by
        from app.evaluation.eval_timing import probe_rates
        from app.plan.estimator import model_shape

        bandwidth, dense = probe_rates(model_shape(spec["model"]))
        return row | {"bandwidth": bandwidth, "dense": dense}
    if spec["kind"] == "steps":  # 8 rows of a 64-token prompt: prefill, then decode steps of 8 rows each
        new, first, rest = _timed(model, tok, BATCH, STEPS_PROMPT, spec["new"])
        return row | {
            "rows": BATCH,
            "prompt_tokens": STEPS_PROMPT,
            "new_tokens": new,
            "prefill_tok_s": BATCH * STEPS_PROMPT / first,
            "step_s": rest / (new - 1),
            "peak_rss_mb": round(peak_rss_mb()),
        }
    if spec["kind"] == "batch":
        from app.data.synthetic import generate_samples
        from app.inference.generate import generate_batch

        convs = [[{"role": "user", "content": s["context"]}] for s in generate_samples(BATCH, seed=5)]
        generate_batch(model, tok, convs[:2], 2, BATCH, progress=False)  # warm-up
        stats: dict[str, int] = {"new_tokens": 0}
        start = time.perf_counter()
        generate_batch(model, tok, convs, spec["new"], BATCH, progress=False, stats=stats)
        seconds = time.perf_counter() - start
        row |= {"new_tokens": stats["new_tokens"], "seconds": round(seconds, 1), "tok_s": stats["new_tokens"] / seconds}
    else:
        new, first, rest = _timed(model, tok, 1, PROMPT, spec["new"])
        row |= {
            "prompt_tokens": PROMPT,
            "new_tokens": new,
            "prefill_s": round(first, 2),
            "prefill_tok_s": PROMPT / first,
            "decode_tok_s": (new - 1) / rest,
        }
    return row | {"peak_rss_mb": round(peak_rss_mb())}


# ---- parent --------------------------------------------------------------------------------------------
def _load() -> float:  # the 1-minute load average: how much else ran on the cores
    return round(os.getloadavg()[0], 2)


def run_logged(
    argv: list[str], log_file: Path, cwd: Path | None = None, cgroup_mb: int | None = None, env: dict | None = None
) -> dict:
    """Run ``argv`` (its output in ``log_file``): rc, wall seconds, load before/after, its peak RSS (wait4)."""
    cg = cgroups.create(cgroup_mb, prefix="bench-infer") if cgroup_mb else None
    if cgroup_mb and cg is None:
        raise SystemExit("bench-infer: cannot create a memory cgroup for the 8 GB case (needs root)")
    before, start = _load(), time.monotonic()
    try:
        with open(log_file, "w") as fh:
            proc = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env, preexec_fn=cg.join if cg else None
            )
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        out = {
            "rc": proc.returncode,
            "wall_s": round(time.monotonic() - start, 1),
            "load_avg": [before, _load()],
            "process_peak_rss_mb": round(usage.ru_maxrss / 1024),
        }
        if cg:
            out |= {
                "cgroup_mb": cgroup_mb,
                "cgroup_peak_mb": cg.peak_mb() and round(cg.peak_mb()),
                "oom_kills": cg.oom_kills(),
            }
        return out
    finally:
        if cg:
            cg.remove()


def measure(results: dict, key: str, spec: dict, logs: Path, cgroup_mb: int | None = None) -> None:
    log_file = logs / (key.replace("/", "_") + ".log")
    run = run_logged(
        [sys.executable, "-m", "bench.bench_infer", "--child", json.dumps(spec)], log_file, cgroup_mb=cgroup_mb
    )
    lines = log_file.read_text(errors="replace").splitlines()
    row = next((json.loads(ln[7:]) for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    results[key] = {**spec, **run, **(row or {"failed": "\n".join(lines[-8:])})}
    save(results)
    log.info("%s: %s", key, json.dumps(results[key])[:400])


def gguf(scratch: Path, shape: str, model_dir: Path, quant: str, results: dict, logs: Path) -> Path:
    """scratch/gguf/<shape>/model-<quant>.gguf, made once: convert to f16 (+ metadata check), then quantize."""
    from app.inference import llamacpp

    out_dir = scratch / "gguf" / shape
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"model-{quant}.gguf"
    if out.is_file():
        return out
    params = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    need = params * BYTES_PER_WEIGHT[quant] + 2**30 + (0 if (out_dir / "model-f16.gguf").is_file() else 2 * params)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise SystemExit(
            f"bench-infer: {out.name} of {shape} needs {need / 2**30:.1f} GB in {out_dir}, {free / 2**30:.1f} GB free"
        )
    f16 = out_dir / "model-f16.gguf"
    if not f16.is_file():
        part, start = out_dir / "model-f16.part.gguf", time.monotonic()
        llamacpp.convert(model_dir, part, "f16", logs / f"convert-{shape}.log")
        llamacpp.align_metadata(part, json.loads((model_dir / "config.json").read_text()), logs / "convert.log")
        os.replace(part, f16)
        results[f"{shape}/convert/f16"] = {"seconds": round(time.monotonic() - start, 1), "bytes": f16.stat().st_size}
    if quant != "f16":
        part, start = out_dir / f"model-{quant}.part.gguf", time.monotonic()
        llamacpp.quantize(f16, part, quant, usable_cpus(), logs / f"quantize-{shape}.log")
        os.replace(part, out)
        results[f"{shape}/convert/{quant}"] = {
            "seconds": round(time.monotonic() - start, 1),
            "bytes": out.stat().st_size,
        }
    save(results)
    return out


def save(results: dict) -> None:
    write_json(RESULTS, {"machine": machine(), "results": results})


def run_shape(size: str, results: dict, scratch: Path, logs: Path, a: argparse.Namespace) -> None:
    shape = MODELS[size]
    free = shutil.disk_usage(scratch).free
    log.info("%s: %s, %.0f GB free in %s", size, shape, free / 2**30, scratch)
    model_dir = build_random_glm(shape, scratch / "models").resolve()
    base = {"model": str(model_dir), "threads": 2}
    parts = set(a.parts.split(","))
    for backend in a.backends.split(","):
        key = f"{size}/single/{backend}"
        if key not in results and "single" in parts:
            path = "" if backend.startswith("torch") else str(gguf(scratch, shape, model_dir, backend, results, logs))
            new = NEW_6B_TORCH if size == "6b" and backend.startswith("torch") else NEW
            # at 6B the 4-bit engines run in the 8 GB cgroup (the user's PC), the rest do not fit it
            cg = CGROUP_MB if size == "6b" and backend in ("torch-4bit", "q4_k_m") else None
            measure(results, key, {**base, "kind": "single", "backend": backend, "gguf": path, "new": new}, logs, cg)
        if size == "6b" and backend == "q4_k_m" and (scratch / "gguf" / shape / "model-f16.gguf").is_file():
            (scratch / "gguf" / shape / "model-f16.gguf").unlink()  # 12 GB, only the quantizer needs it
    if size == "1.5b" and "calibrate" in parts:  # the engine shares of app/evaluation/eval_timing.py
        if f"{size}/probe" not in results:
            measure(results, f"{size}/probe", {**base, "kind": "probe", "backend": "torch-fp32"}, logs)
        for backend in infer_eval.CALIBRATED:
            path = "" if backend.startswith("torch") else str(gguf(scratch, shape, model_dir, backend, results, logs))
            for kind, new in (("single", NEW), ("steps", STEPS_NEW)):
                if f"{size}/{kind}/{backend}" not in results:
                    measure(
                        results,
                        f"{size}/{kind}/{backend}",
                        {**base, "kind": kind, "backend": backend, "gguf": path, "new": new},
                        logs,
                    )
    if size == "1.5b" and "batch" in parts:
        for backend in a.batch_backends.split(","):
            key = f"{size}/batch/{backend}"
            if key not in results:
                path = (
                    "" if backend.startswith("torch") else str(gguf(scratch, shape, model_dir, backend, results, logs))
                )
                measure(
                    results, key, {**base, "kind": "batch", "backend": backend, "gguf": path, "new": a.batch_new}, logs
                )
    if "evaluate" in parts:  # at 6B only what fits the 8 GB cgroup and ends in minutes: llama.cpp
        for backend in ("torch", "llama.cpp") if size == "1.5b" else a.eval_backends_6b.split(","):
            infer_eval.evaluate(
                results,
                size,
                backend,
                model_dir,
                scratch,
                logs,
                a.eval_samples if size == "1.5b" else a.eval_samples_6b,
                run_logged,
                save,
                log_facts,
                CGROUP_MB if size == "6b" else None,
            )


def calibrate_tiny(results: dict, scratch: Path, logs: Path) -> None:
    """The demo's model (0.9M weights: no bandwidth or FLOPs to speak of) through torch fp32 and llama.cpp q8_0."""
    gguf_file = scratch / "demo-eval" / "gguf-q8_0" / "model-q8_0.gguf"
    if not gguf_file.is_file():
        log.warning("calibrate: %s is missing: run the demo part first", gguf_file)
        return
    base = {"model": str(infer_eval.DEMO_RUN.resolve()), "threads": 2}
    for backend, path in (("torch-fp32", ""), ("q8_0", str(gguf_file))):
        for kind, new in (("single", NEW), ("steps", STEPS_NEW)):
            if f"demo/{kind}/{backend}" not in results:
                measure(
                    results,
                    f"demo/{kind}/{backend}",
                    {**base, "kind": kind, "backend": backend, "gguf": path, "new": new},
                    logs,
                )
    if "demo/probe" not in results:
        measure(results, "demo/probe", {**base, "kind": "probe", "backend": "torch-fp32"}, logs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scratch",
        type=Path,
        default=Path.cwd().resolve().parent / "bench-infer-scratch",
        help="models, GGUFs and logs (outside the checkout; ~35 GB at the 6B step)",
    )
    ap.add_argument("--sizes", default="1.5b,6b", help="comma-separated: 1.5b, 6b")
    ap.add_argument(
        "--parts",
        default="single,batch,calibrate,evaluate,demo",
        help="comma-separated: single, batch, calibrate (app/evaluation/eval_timing.py's engine shares), "
        "evaluate, demo (the F1 of `make demo`'s model per backend)",
    )
    ap.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="one stream: comma-separated subset of " + ", ".join(BACKENDS + MORE_BACKENDS),
    )
    ap.add_argument("--batch-backends", default="torch-bf16,torch-4bit,q8_0,q4_k_m", help="8 concurrent requests")
    ap.add_argument("--batch-new", type=int, default=NEW, help="new tokens per request in the batch")
    ap.add_argument("--eval-samples", type=int, default=EVAL_N, help="records `make evaluate` answers at 1.5B")
    ap.add_argument("--eval-samples-6b", type=int, default=EVAL_N_6B, help="... and at 6B")
    ap.add_argument("--eval-backends-6b", default="llama.cpp", help="evaluate at 6B: torch, llama.cpp or both")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="measure again what --sizes and --parts select, though bench/infer.json has it",
    )
    ap.add_argument("--report-only", action="store_true", help="rewrite bench/infer.md from bench/infer.json")
    ap.add_argument("--notes", default="", help="a paragraph for the report (e.g. what else the machine did)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    setup_logging()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)  # cli-output
        return 0
    results = json.loads(RESULTS.read_text())["results"] if RESULTS.is_file() else {}
    if a.fresh:  # measure again what --sizes and --parts select; every other result stays
        chosen = {(s, p) for s in a.sizes.split(",") for p in a.parts.split(",")}
        results = {k: v for k, v in results.items() if tuple(k.split("/")[:2]) not in chosen}
    if not a.report_only:
        logs = a.scratch / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for size in filter(None, a.sizes.split(",")):
            run_shape(size, results, a.scratch, logs, a)
            write_report(results, a.notes)
        if "demo" in a.parts.split(","):
            infer_eval.demo(results, a.scratch, logs, run_logged, save, log_facts)
        if "calibrate" in a.parts.split(","):  # a tiny model's decode step: the engines' fixed cost per step
            calibrate_tiny(results, a.scratch, logs)
    write_report(results, a.notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
