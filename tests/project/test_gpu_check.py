"""The GPU check for a machine with no network (issue 33): scripts/gpu-wheels.sh fetches, here, the wheels the
GPU tier needs that the device image lacks; scripts/gpu-check.sh, handed unchanged to the device, installs them
and runs `make test-gpu`. What can be checked without a GPU or network: both scripts parse, the check refuses
in one line when the wheels are missing or VENV is not a venv it may clear, and the wheel list covers every
requirements.txt package the tier uses, at its pin."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "gpu-check.sh"
WHEELS = REPO / "scripts" / "gpu-wheels.sh"

# requirements.txt packages the GPU tier does not use, and so never carries.
OUTSIDE_TIER = {
    "torch": "the device's own CUDA build (the pin is the CPU-friendly release)",
    "gradio": "the web UI",
    "gradio-client": "the web UI's tests",
    "playwright": "the web UI's browser tests",
    "onnx": "ONNX export, on the CPU",
    "onnxscript": "ONNX export, on the CPU",
    "onnxruntime": "ONNX export, on the CPU",
}


def _name(spec: str) -> str:
    return re.sub(r"[-_.]+", "-", spec.split("==")[0]).lower()


def _array(name: str) -> dict[str, str | None]:
    """A bash array of gpu-wheels.sh (NAME=( ... ), one word per package) as {name: pinned version or None}."""
    block = re.search(rf"^{name}=\((.*?)^\)", WHEELS.read_text(), re.M | re.S)
    assert block, f"no {name}=( ... ) array in {WHEELS}"
    words = shlex.split(block.group(1), comments=True)
    return {_name(w): (w.split("==")[1] if "==" in w else None) for w in words}


def _run_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(tmp_path / "venv"), **env}
    return subprocess.run([str(CHECK)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", [CHECK, WHEELS], ids=lambda p: p.name)
def test_the_script_parses_and_is_executable(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable (chmod +x)"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty"])
def test_without_wheels_the_check_says_in_one_line_to_run_gpu_wheels(tmp_path, made):
    wheels = tmp_path / "wheels"
    if made:
        wheels.mkdir()
    proc = _run_check(tmp_path, GPU_WHEELS_DIR=str(wheels))
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and "scripts/gpu-wheels.sh" in lines[0] and str(wheels) in lines[0], lines
    assert not (tmp_path / "venv").exists()  # nothing made before the refusal


def test_a_venv_folder_that_is_not_a_venv_is_refused_not_cleared(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    proc = _run_check(tmp_path, GPU_WHEELS_DIR=str(wheels), VENV=str(mine))
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and f"VENV={mine}" in lines[0], lines
    assert (mine / "keep.txt").read_text() == "a user's file"


def test_the_wheels_cover_every_package_the_tier_uses_at_its_pin():
    pins = {
        _name(line): line.split("==")[1].strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    carried, device = _array("PACKAGES"), _array("DEVICE_HAS")
    problems = []
    for name, pin in pins.items():
        if name in OUTSIDE_TIER:
            continue
        if name in carried:
            if carried[name] not in (None, pin):
                problems.append(f"{name}: gpu-wheels.sh pins {carried[name]}, requirements.txt {pin}")
        elif name in device:
            if device[name] not in (None, pin):
                problems.append(f"{name}: the device has {device[name]}, requirements.txt pins {pin}: carry it")
        else:
            problems.append(f"{name}: neither carried (PACKAGES) nor on the device (DEVICE_HAS)")
    assert not problems, problems
