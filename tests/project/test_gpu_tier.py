"""The GPU tier's wiring where there is no GPU: `make test-gpu` (python -m bench.bench_gpu) skips each test of
tests/gpu naming the reason and leaves bench/gpu.md alone; REQUIRE_GPU=1 makes the same run fail; and the report
judges what a GPU run measured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU answers here: `make test-gpu` runs the tier itself instead of skipping it")


def _bench_gpu(child_env, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu"],
        cwd=REPO,
        env={**child_env, "PYTHONDONTWRITEBYTECODE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_a_gpu_every_test_skips_naming_why_and_the_report_stays(no_gpu, child_env, snapshot):
    before = snapshot(REPO / "bench")
    proc = _bench_gpu(child_env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    skipped = int(re.search(r"(\d+) skipped", out).group(1))
    assert skipped >= 10 and " passed" not in out and " failed" not in out, out[-3000:]
    assert "no CUDA: torch " in out and "is a CPU build" in out  # the reason, on each skip line
    assert "bench/gpu.md and bench/gpu.json are left as they are" in out
    assert snapshot(REPO / "bench") == before


def test_require_gpu_turns_each_skip_into_a_failure(no_gpu, child_env):
    proc = _bench_gpu(child_env, REQUIRE_GPU="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "REQUIRE_GPU=1: no CUDA" in out and " skipped" not in out, out[-3000:]


def test_ci_requires_the_gpu_tier_where_a_gpu_answers():
    ci = (REPO / ".ci" / "run").read_text()
    assert "REQUIRE_GPU=$gpu make test" in ci and "nvidia-smi -L" in ci
    assert "REQUIRE_DEEPSPEED=1" in ci and "-r requirements-deepspeed.txt" in ci


def test_the_report_judges_each_figure_and_the_speed():
    from bench.gpu_report import report, targets

    result = {
        "machine": {"gpu": "NVIDIA H100 80GB HBM3", "vram_gb": 79.1, "torch": "2.11.0+cu130"},
        "load": [0.5, 0.4, 0.3],
        "wall_s": 500.0,
        "budget_s": 480,
        "pytest_exit": 1,
        "tests": [{"test": "test_a::t", "outcome": "failure", "seconds": 3.0, "message": "assert 1.2 <= 1.15 | x"}],
        "figures": [
            {"name": "peak VRAM", "value": 1.2, "target": "0.85-1.15", "passed": False, "detail": ""},
            {"name": "golden", "value": [7.5, 7.4], "target": "recorded now", "passed": None, "detail": ""},
            {"name": "zero2", "value": 1e-5, "target": "<= 0.001", "passed": True, "detail": ""},
        ],
        "speed": {
            "model": "qwen2-0.5b",
            "samples": 2000,
            "trl": {"tokens": 300000, "seconds": 10.0, "tokens_per_s": 30000.0, "steps": 40, "train_loss": 9.0,
                    "attention": "sdpa", "peak_vram_mb": 9000.0},
            "project": {"tokens": 300000, "seconds": 12.0, "tokens_per_s": 25000.0, "steps": 38, "train_loss": 9.1,
                        "batch": 50, "peak_vram_mb": 8000.0},
        },
    }  # fmt: skip
    judged = dict(targets(result))
    assert judged == {
        "every test of the tier passes (1 run)": False,
        "`make test-gpu` within 8 min: 500 s": False,
        "peak VRAM: 1.2 (0.85-1.15)": False,
        "zero2: 1e-05 (<= 0.001)": True,
        "tokens/s >= TRL's: 0.83x": False,
    }
    text = report(result)
    assert "| golden | [7.5, 7.4] | recorded now | recorded |" in text  # a first run's golden: recorded, not judged
    assert "assert 1.2 <= 1.15 \\| x" in text  # a message's | cannot break the table
    assert text.count("-> FAIL") == 4 and text.count("-> PASS") == 1


def test_the_speed_runs_ignore_makes_command_line(monkeypatch):
    """`make test-gpu REQUIRE_GPU=1` puts REQUIRE_GPU=1 in MAKEFLAGS, which the app reads as settings: the speed
    comparison's `python -m app train` must not inherit it (nor a setting the shell holds)."""
    from bench.bench_gpu import app_env

    monkeypatch.setenv("MAKEFLAGS", " -- REQUIRE_GPU=1 MAX_SAMPLES=3")
    monkeypatch.setenv("MAX_SAMPLES", "3")
    env = app_env(GPU_FIGURES="x")
    assert "MAKEFLAGS" not in env and "MAX_SAMPLES" not in env and env["GPU_FIGURES"] == "x"
