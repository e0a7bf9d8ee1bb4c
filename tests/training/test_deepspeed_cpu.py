"""DeepSpeed through the launcher, on the CPU: DeepSpeed's own CPU accelerator (DS_ACCELERATOR=cpu) runs the
shipped ZeRO-2 and ZeRO-3 offload configs as one torchrun worker, checkpoints included, to the plain run's losses
and adapter. The same path on CUDA is tests/gpu/test_deepspeed.py; this one runs wherever deepspeed is installed
(`.ci/run` installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5  # the same fp32 arithmetic; ZeRO-3 reduces partitioned gradients in another order (seen: 1.9e-6)


@pytest.fixture(scope="module")
def deepspeed():
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        why = "deepspeed is not installed (DS_BUILD_OPS=0 .venv/bin/pip install --no-build-isolation deepspeed)"
        if os.environ.get("REQUIRE_DEEPSPEED", "0") not in ("", "0"):
            pytest.fail(f"REQUIRE_DEEPSPEED=1: {why}", pytrace=False)
        pytest.skip(why)


def _train(recipe, model, data, out, env, **extra):
    from app.config import show

    cfg = recipe(model, data, out, LORA_DROPOUT=0, **extra)
    args = [f"{var}={show(cfg.get(var))}" for var in sorted(cfg.explicit)]
    return subprocess.run(
        [sys.executable, "-m", "app", "train", *args],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def plain(tiny_glm_dir, data_dir, recipe, tmp_path_factory, make_app_env):
    out = tmp_path_factory.mktemp("plain") / "out"
    proc = _train(recipe, tiny_glm_dir, data_dir, out, make_app_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, _weights_line(proc.stderr)


def _weights_line(log: str) -> str:
    return next(line.split(": ", 1)[1] for line in log.splitlines() if "app.training.trainable: weights:" in line)


@pytest.mark.parametrize("config", ["ds_zero2.json", "ds_zero3_offload.json"])
def test_deepspeed_on_the_cpu_trains_to_the_plain_runs_losses(
    config, deepspeed, plain, tiny_glm_dir, data_dir, recipe, tmp_path, make_app_env, train_losses
):
    (plain, plain_weights), out, ds = plain, tmp_path / "out", REPO / "configs" / config
    proc = _train(recipe, tiny_glm_dir, data_dir, out, make_app_env(DS_ACCELERATOR="cpu"), DS_CONFIG=ds)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"torchrun: 1 processes (gloo, a free local port), DeepSpeed {ds}" in proc.stderr
    # what the model stores, as the plain run counted it (ZeRO-3's partitioned weights read 0 MB)
    assert _weights_line(proc.stderr) == plain_weights
    got, want = train_losses(out), train_losses(plain)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]  # through the step-3 checkpoint and the evals
    assert max(abs(got[s] - want[s]) for s in want) <= TOL, (got, want)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= TOL


def test_the_launcher_puts_the_interpreters_tools_first_on_path(monkeypatch):
    """`make` runs .venv/bin/python without activating the venv, so DeepSpeed's JIT build found no `ninja` where
    the system has none ("Unable to JIT load the deepspeed_shm_comm op due to ninja not being installed")."""
    from app.training.launcher import interpreter_tools_on_path

    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    interpreter_tools_on_path()
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    interpreter_tools_on_path()  # already there: unchanged
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
