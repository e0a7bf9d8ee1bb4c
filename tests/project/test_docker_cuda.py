"""The CUDA image's files (Dockerfile.cuda, docker-compose.cuda.yml, scripts/ci-docker-cuda.sh), checked without an
engine; scripts/ci-docker-cuda.sh builds the image and checks it (bench/docker-cuda.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.config import Config
from app.plan.explain import format_info
from app.plan.resources import detect_resources
from app.plan.tiers import apply_tier

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ci-docker-cuda.sh"
# What a build needs to reach beyond PyPI and Debian's archive: none of these may be a default.
REGISTRIES = ("download.pytorch.org", "nvidia/", "nvcr.io")


def _compose(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


def test_every_service_runs_on_the_cuda_image_with_the_gpu_reserved():
    """`make serve CUDA=1`, `make webui CUDA=1` (and every other target) get the CUDA image and the GPU: each service
    of docker-compose.yml but the one that builds is overridden."""
    cuda = _compose("docker-compose.cuda.yml")["services"]
    for name in set(_compose("docker-compose.yml")["services"]) - {"setup"}:
        assert name in cuda, f"docker-compose.cuda.yml lacks {name}"
        assert cuda[name]["image"] == "chatglm-cpu-trainer:cuda", name
        (device,) = cuda[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert device["count"] == "${GPU_COUNT:-all}", name
    assert cuda["setup"]["image"] == "chatglm-cpu-trainer:cuda"


def test_the_default_cuda_build_needs_only_pypi():
    """`make setup CUDA=1` with nothing set builds where only PyPI (and the base's apt archive) answers: no default
    names the PyTorch index or an NVIDIA registry, and the base is the CPU image's."""
    dockerfile = (REPO / "Dockerfile.cuda").read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.M))
    cpu_args = dict(re.findall(r"^ARG (\w+)=(.*)$", (REPO / "Dockerfile").read_text(encoding="utf-8"), flags=re.M))
    assert args["BASE_IMAGE"] == cpu_args["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"] == ""  # pip's index: PyPI's torch is the CUDA build
    build = _compose("docker-compose.cuda.yml")["services"]["setup"]["build"]
    assert build["dockerfile"] == "Dockerfile.cuda"
    defaults = {k: re.fullmatch(r"\$\{(\w+):-(.*)\}", v).groups() for k, v in build["args"].items()}
    assert defaults == {
        "BASE_IMAGE": ("CUDA_BASE_IMAGE", args["BASE_IMAGE"]),
        "TORCH_INDEX_URL": ("CUDA_TORCH_INDEX_URL", ""),
    }
    for name, value in args.items():
        assert not any(r in value for r in REGISTRIES), f"Dockerfile.cuda: ARG {name}={value}"
    # the makefile keeps a rebuild on the image's own base through the same variable compose reads
    assert "BASE_VAR := $(if $(CUDA_ON),CUDA_BASE_IMAGE,BASE_IMAGE)" in (REPO / "Makefile").read_text(encoding="utf-8")


def test_the_cuda_image_says_which_llama_cpp_backend_it_builds():
    """An nvidia/cuda base (it sets CUDA_VERSION) builds llama.cpp's CUDA backend, any other base the CPU one from
    wheels/; the build log says which in one line, both ways."""
    deps = re.split(r"^# ---- app", (REPO / "Dockerfile.cuda").read_text(encoding="utf-8"), flags=re.M)[0]
    assert re.search(r'if \[ -n "\$\{CUDA_VERSION:-\}" \]', deps)
    assert len(re.findall(r'echo "llama\.cpp backend: (CUDA|CPU)\b', deps)) == 2
    assert "PIP_FIND_LINKS=wheels" in deps


def test_the_cuda_check_script_runs_on_demand_not_per_commit():
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"
    if not shutil.which("bash"):
        pytest.skip("needs bash")
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text(encoding="utf-8")
    assert "bench/docker-cuda.md" in text and "Not in .ci/run" in text
    assert "ci-docker-cuda" not in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_info_says_in_one_line_that_there_is_no_gpu_and_why():
    """make info's GPU row when torch sees none: a CPU-only torch says so; a CUDA torch (the CUDA image run without
    the GPU, as scripts/ci-docker-cuda.sh checks) gives torch's own reason."""
    import torch

    res = detect_resources()
    plan = apply_tier(Config.from_dict({"MODEL_NAME": "tiny"}), res)
    rows = [line.strip() for line in format_info(res, plan, None, "tiny").splitlines() if re.match(r"\s+GPU", line)]
    if torch.cuda.is_available():
        assert rows and not [r for r in rows if "none" in r], rows
        return
    (row,) = rows
    said = re.fullmatch(r"GPU\s+(.*)", row).group(1)
    if torch.version.cuda:
        assert said.startswith(f"none: torch {torch.__version__} is built for CUDA {torch.version.cuda}, but: "), said
    else:
        assert said == f"none: torch {torch.__version__} is a CPU-only build"


def test_the_smoke_runs_removal_can_reach_only_the_folder_it_made():
    """The smoke run's folder used to be a fixed models/ci-cuda-tiny, removed with rm -rf after the check whether the
    run had made it or it was a folder of yours. It is now made by mktemp for the run; nothing else is removed."""
    text = SCRIPT.read_text(encoding="utf-8")
    assert "RUN_DIR=$(mktemp -d models/ci-cuda-tiny.XXXXXX)" in text
    assert text.count("RUN_DIR=") == 1  # no fixed name set anywhere
    removals = [line.strip() for line in text.splitlines() if re.search(r"\brm -[a-z]*r", line)]
    assert removals == ['rm -rf --one-file-system "$RUN_DIR"'], removals
