"""The GPU tier (`make test-gpu`, marked ``gpu``): what only a CUDA GPU can prove.

Every test here skips without CUDA, naming what is missing; with REQUIRE_GPU=1 (scripts/gpu-check.sh on a
lent GPU) that is a failure instead. The tests share, through the fixtures below:

- ``figure(name, value, target, passed, detail="")``: one measured figure for bench/gpu.md, appended as a JSON
  line to $GPU_FIGURES (bench/bench_gpu.py sets it; a plain pytest run keeps them in its own temp dir);
- ``train_run(cfg, device="cuda", script=TRAIN_AND_MEASURE)``: `python -m app train` as its own process (a
  clean CUDA context for every memory figure, and none held by pytest's), on CUDA or, with CUDA hidden, on the
  CPU; it returns the process and the CUDA memory the run held (torch's own peak counters);
- ``recipe_run(variant, device)``: the golden recipe under one of VARIANTS, run once per session;
- ``random_model(name)``: a random ~0.5B or ~1.5B Qwen2 built once (in $GPU_MODELS_DIR when set, so the
  TRL comparison in bench/bench_gpu.py reuses it).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `python -m app <argv>` in this process, then torch's own CUDA figures (MB) as JSON in $CUDA_MEMORY_FILE: the
# peak reserved by the caching allocator, and what the device holds for the process beyond it (context, cuBLAS
# and NCCL workspaces), read from the driver at the end. The sampler in summary.json polls; these do not miss.
TRAIN_AND_MEASURE = """
import json, os, sys
from app.__main__ import main
code = main(sys.argv[1:])
import torch
if torch.cuda.is_available() and torch.cuda.is_initialized():
    free, total = torch.cuda.mem_get_info()
    mb = 2**20
    figures = {
        "max_reserved_mb": torch.cuda.max_memory_reserved() / mb,
        "outside_allocator_mb": (total - free - torch.cuda.memory_reserved()) / mb,
        "device_total_mb": total / mb,
    }
    with open(os.environ["CUDA_MEMORY_FILE"], "w") as fh:
        json.dump(figures, fh)
sys.exit(code)
"""


def _why_no_cuda() -> str | None:
    from bench.bench_gpu import why_no_cuda

    why = why_no_cuda()
    hint = (
        "on a machine where nvidia-smi answers, make setup installs the CUDA build; on a lent GPU, scripts/gpu-check.sh"
    )
    return None if why is None else f"no CUDA: {why} ({hint})"


def pytest_runtest_setup(item):
    """Before any fixture of the test is built: nothing here runs, or builds a model, without a GPU."""
    why = _why_no_cuda()
    if why and os.environ.get("REQUIRE_GPU", "0") not in ("", "0"):
        pytest.fail(f"REQUIRE_GPU=1: {why}", pytrace=False)
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def gpu_package():
    """gpu_package(name): the test needs this package (deepspeed...); a skip naming it and scripts/gpu-wheels.sh
    where it is missing, a failure under REQUIRE_GPU=1 (the tier was meant to run whole)."""
    import importlib.util

    def need(name: str) -> None:
        if importlib.util.find_spec(name) is None:
            why = f"{name} is not installed (pip install {name}; on a lent GPU scripts/gpu-wheels.sh carries it)"
            if os.environ.get("REQUIRE_GPU", "0") not in ("", "0"):
                pytest.fail(f"REQUIRE_GPU=1: {why}", pytrace=False)
            pytest.skip(why)

    return need


@pytest.fixture(scope="session")
def figure(tmp_path_factory):
    """figure(name, value, target, passed, detail="") -> None: one row of bench/gpu.md."""
    path = Path(os.environ.get("GPU_FIGURES") or tmp_path_factory.mktemp("gpu") / "figures.jsonl")

    def record(name: str, value, target: str, passed: bool | None, detail: str = "") -> None:
        row = {"name": name, "value": value, "target": target, "passed": passed, "detail": detail}
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    return record


HANG_GUARD_S = 900  # only so a broken run cannot hang the tier; never what a test asserts


def _train(app_env, cfg, device: str = "cuda", script: str = TRAIN_AND_MEASURE):
    """``script``: the `python -c` program that runs the command (TRAIN_AND_MEASURE, or a test's own)."""
    from app.config import show

    out = Path(cfg.train.output_dir)
    args = [f"{var}={show(cfg.get(var))}" for var in sorted(cfg.explicit)]
    memory = out.parent / f"{out.name}-cuda-memory.json"
    env = app_env(CUDA_MEMORY_FILE=str(memory), **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", script, "train", *args],
        cwd=out.parent,  # models/.last_run goes there, not into the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    return proc, json.loads(memory.read_text()) if memory.is_file() else {}


@pytest.fixture(scope="session")
def train_run(make_app_env):
    """train_run(cfg, device="cuda", script=TRAIN_AND_MEASURE) -> (process, CUDA memory figures): `python -m app
    train` with cfg's settings in its own process (CUDA hidden for device="cpu"), cwd OUTPUT_DIR's parent."""
    return functools.partial(_train, make_app_env)


# The golden recipe (tests/conftest.py `recipe`) under each variant the tier compares. LoRA dropout draws its masks
# from each device's own generator, so runs compared across devices, or with DeepSpeed, train without it.
VARIANTS = {
    "lora-fp32": {"LORA_DROPOUT": 0},
    "qlora-4bit": {"LORA_DROPOUT": 0, "QUANT_LEVEL": "4bit"},
    "lora-bf16": {"LORA_DROPOUT": 0, "PRECISION": "bf16"},
    "lora-dropout": {},
    "full-fp32": {"METHOD": "full", "LEARNING_RATE": 1e-3},
    "full-bf16": {"METHOD": "full", "LEARNING_RATE": 1e-3, "PRECISION": "bf16"},
}


@pytest.fixture(scope="session")
def recipe_run(tiny_glm_dir, make_data, recipe, train_run, tmp_path_factory):
    """recipe_run(variant, device="cuda", prefix="", **settings) -> (process, CUDA memory, out dir): the golden
    recipe under VARIANTS[variant] (and ``settings``), run once per session for each combination; ``prefix``:
    Python run before TRAIN_AND_MEASURE in that process (a probe)."""
    data, root, done = make_data(n_train=80, n_dev=10, seed=1), tmp_path_factory.mktemp("recipe-runs"), {}

    def run(variant: str, device: str = "cuda", prefix: str = "", **settings):
        key = (variant, device, prefix, tuple(sorted(settings.items())))
        if key not in done:
            out = root / f"{variant}-{device}-{len(done)}" / "out"
            cfg = recipe(tiny_glm_dir, data, out, **VARIANTS[variant], **settings)
            done[key] = (*train_run(cfg, device, prefix + TRAIN_AND_MEASURE), out)
        return done[key]

    return run


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    """random_model(name) -> the dir of a random Qwen2 of bench/bench_gpu.py's QWEN_SHAPES[name] (Qwen2.5-0.5B's or
    -1.5B's shape) with the tiny tokenizer, built once."""
    from bench.bench_gpu import build_model

    root = Path(os.environ.get("GPU_MODELS_DIR") or tmp_path_factory.mktemp("gpu-models"))
    return lambda name: build_model(name, root)
