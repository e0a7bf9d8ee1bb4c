"""`make test-gpu`: the GPU tier (tests/gpu, marked gpu) and the GPU speed against TRL's best GPU setup, in one
run, into bench/gpu.md and bench/gpu.json.

1. the tier: `pytest -m gpu tests/gpu` in its own process; each test adds its figures (golden losses, predicted
   vs measured VRAM, DeepSpeed vs plain, serve) to a JSON-lines file this script reads back;
2. the speed: `python -m app train` and bench/reference_trl_sft.py (TRL's SFTTrainer: bf16, packing, padding-free)
   on the same random ~0.5B Qwen2, the same synthetic triplet samples, LoRA r=8 on every projection, one epoch;
   tokens trained per second of each training loop.

Without CUDA nothing is measured: the tier's skip lines are printed, bench/gpu.md is left as it is, and the exit
status is pytest's (a failure under REQUIRE_GPU=1). Run `make test-gpu`; on a lent GPU with no network,
scripts/gpu-check.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

from app.core.atomic import atomic_write_text, write_json
from app.core.utils import setup_logging
from app.training.metrics_file import read_metrics
from bench.bench_speed import app_env, run

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60  # the bound for the whole of `make test-gpu` on one H100-class GPU
# Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes, random weights, the tiny tokenizer (tests/gpu builds them too).
QWEN_SHAPES = {
    "qwen2-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "qwen2-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
}
QWEN_VOCAB = 151936
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "deepspeed")


def build_model(name: str, root: Path) -> Path:
    """root/name: a random Qwen2 of QWEN_SHAPES[name] with the tiny tokenizer, built once."""
    from app.models.tiny import build_tiny_model

    out = root / name
    if not (out / "config.json").is_file():
        # bf16, as the GPU loads it anyway: half the seconds and disk of fp32 (6 GB at 1.5B)
        build_tiny_model("tiny-qwen2", out, dims=QWEN_SHAPES[name], vocab_size=QWEN_VOCAB, dtype="bfloat16")
    return out


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "cuda_build": torch.version.cuda}
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "vram_gb": round(props.total_memory / 2**30, 1), "capability": props.major}
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = smi.stdout.strip() if smi.returncode == 0 else None
    return info


def tier(work: Path) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """pytest -m gpu tests/gpu, its output passed through: (exit status, each test's outcome, the figures)."""
    figures, junit = work / "figures.jsonl", work / "junit.xml"
    env = app_env(GPU_FIGURES=str(figures), GPU_MODELS_DIR=str(work / "models"))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    code = subprocess.run([*cmd, f"--junitxml={junit}"], cwd=ROOT, env=env).returncode
    tests = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            tests.append(
                {
                    "test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                    "outcome": "passed" if bad is None else bad.tag,
                    "seconds": float(case.get("time") or 0),
                    "message": "" if bad is None else (bad.get("message") or "").splitlines()[0][:300],
                }
            )
    rows = [json.loads(x) for x in figures.read_text().splitlines()] if figures.is_file() else []
    return code, tests, rows


def speed(work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """TRL's SFTTrainer, then `python -m app train`, on the same model and samples; tokens trained per second."""
    from app.data.synthetic import generate_samples

    model, data = build_model("qwen2-0.5b", work / "models"), work / "speed.jsonl"
    rows = generate_samples(a.samples, seed=7)
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    trl_result = work / "trl.json"
    trl_cmd = [sys.executable, "-m", "bench.reference_trl_sft", "--model", str(model), "--data", str(data)]
    trl_cmd += ["--out", str(work / "trl"), "--result", str(trl_result), "--samples", str(a.samples)]
    trl_cmd += ["--batch", str(a.rows), "--max-length", str(a.max_length), "--lr", str(a.lr), "--targets", TARGETS]
    run(trl_cmd, "TRL SFTTrainer (bf16, packing, padding-free)", app_env())
    trl = json.loads(trl_result.read_text())
    # The same tokens per optimizer step: TRL's batch counts packed rows of max_length tokens, ours samples.
    batch = max(1, round(a.rows * a.max_length / (trl["tokens"] / a.samples)))
    out = work / "project"
    settings = {
        "MODEL_NAME": model,
        "DATA_PATH": data,
        "OUTPUT_DIR": out,
        "MAX_SAMPLES": a.samples,
        "VAL_SIZE": 0,
        "MAX_SEQ_LEN": a.max_length,
        "BATCH_SIZE": batch,
        "GRAD_ACCUM": 1,
        "NUM_EPOCHS": 1,
        "LEARNING_RATE": a.lr,
        "LORA_R": 8,
        "LORA_ALPHA": 16,
        "LORA_DROPOUT": 0.05,
        "LORA_TARGETS": TARGETS,
        "SEED": 42,
        "LOGGING_STEPS": 1,
        "SAVE_STEPS": 100000,
        "TIER": "none",
    }
    run([sys.executable, "-m", "app", "train", *(f"{k}={v}" for k, v in settings.items())], "project", app_env())
    summary = json.loads((out / "summary.json").read_text())
    tokens = json.loads((out / "data_report.json").read_text())["train"]["tokens"]
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    project = {
        "seconds": summary["seconds"],
        "tokens": tokens,
        "tokens_per_s": tokens / summary["seconds"],
        "steps": summary["steps"],
        "train_loss": summary["train_loss"],
        "losses": losses,
        "batch": batch,
        "peak_vram_mb": (summary.get("memory") or {}).get("peak_cuda_reserved_mb"),
    }
    return {"model": model.name, "samples": a.samples, "trl": trl, "project": project}


def why_no_cuda() -> str | None:
    """None where torch sees a CUDA GPU, else why not in one line: a CPU build, or for a CUDA build what `make info`
    says (app.plan.resources.no_gpu_reason: torch's own reason, e.g. no NVIDIA driver)."""
    import torch

    from app.plan.resources import no_gpu_reason

    if torch.cuda.is_available():
        return None
    return no_gpu_reason() if torch.version.cuda else f"torch {torch.__version__} is a CPU build"


def main() -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="synthetic samples both speed runs train on")
    ap.add_argument("--rows", type=int, default=8, help="TRL's batch: packed rows per step")
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (MAX_SEQ_LEN for ours)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--skip-speed", action="store_true", help="the tier only")
    a = ap.parse_args()
    t0, load = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gpu-tier-") as tmp:
        work = Path(tmp)
        code, tests, figures = tier(work)
        if (why := why_no_cuda()) is not None:
            log.info("no GPU (%s): nothing measured; bench/gpu.md and bench/gpu.json are left as they are", why)
            return code
        result = {"machine": machine(), "load": [round(x, 2) for x in load], "budget_s": BUDGET_S}
        result |= {"pytest_exit": code, "tests": tests, "figures": figures, "speed": {"pending": True}}
        write(result, t0)  # the tier's figures are kept even if the speed runs are cut off
        try:
            result["speed"] = None if a.skip_speed else speed(work, a)
        except (RuntimeError, OSError, KeyError, ValueError) as e:  # a FAIL in the report; the tier's rows stay
            log.error("the speed comparison failed: %s", e)
            result["speed"] = {"error": str(e)[-2000:]}
    write(result, t0)
    log.info("wrote bench/gpu.md and bench/gpu.json in %.0f s", result["wall_s"])
    return code or int(result["speed"] is not None and "error" in result["speed"])  # slower is a FAIL there only


def write(result: dict[str, Any], t0: float) -> None:
    from bench.gpu_report import report

    result["wall_s"] = round(time.monotonic() - t0, 1)
    write_json(ROOT / "bench" / "gpu.json", result)
    atomic_write_text(ROOT / "bench" / "gpu.md", report(result))


if __name__ == "__main__":
    raise SystemExit(main())
