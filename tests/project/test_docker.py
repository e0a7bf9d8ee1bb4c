"""The Docker wiring, checked without an engine (CI builds and runs the images for real:
scripts/ci-docker.sh): every setting reaches the container, the compose services share the
mounts and run as the invoking user, and the images keep data, models and secrets out."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.config import Config

REPO = Path(__file__).resolve().parents[2]
SERVICES = {"setup", "train", "predict", "predict-custom", "evaluate", "merge", "export-gguf", "info", "test"}

if not (REPO / "docker-compose.yml").is_file():  # inside the image: these files stay out of it
    pytest.skip("the Docker files are not here", allow_module_level=True)


def _make_n(*args):
    if not shutil.which("make"):
        pytest.skip("needs make")
    proc = subprocess.run(
        ["make", "-n", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": "/tmp"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_docker_runtime_forwards_every_setting():
    """`make train MAX_SAMPLES=100` must mean the same in the container as in .venv."""
    settings = sorted(Config.variables())
    out = _make_n("train", "RUNTIME=docker", *(f"{v}=x" for v in settings))
    assert out.startswith("runtime: docker (RUNTIME=docker was given)")
    run = next(line for line in out.splitlines() if line.endswith(" -m app train"))  # after any generate-data
    assert run.startswith("docker compose run --rm ") and run.endswith("--entrypoint python app -m app train")
    forwarded = set(re.findall(r"-e (\w+)", run))
    assert set(settings) <= forwarded, set(settings) - forwarded
    # nothing given, no setting forwarded (the container then sees .env and the defaults); MAKEFLAGS
    # always goes along, so the app in the container checks the make command line for misspelt names
    quiet = next(line for line in _make_n("train", "RUNTIME=docker").splitlines() if line.endswith(" -m app train"))
    assert re.findall(r"-e (\w+)", quiet) == ["MAKEFLAGS"]


def test_local_runtime_and_make_test_stay_on_the_host():
    assert ".venv/bin/python -m app train" in _make_n("train", "RUNTIME=local")
    for runtime in ("local", "docker"):
        out = _make_n("test", f"RUNTIME={runtime}")
        assert ".venv/bin/python -m pytest -q" in out and "compose" not in out


def test_bad_runtime_is_named_with_the_fix():
    if not shutil.which("make"):
        pytest.skip("needs make")
    proc = subprocess.run(["make", "-n", "train", "RUNTIME=podman"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "RUNTIME=podman: use RUNTIME=docker or RUNTIME=local" in proc.stderr


def test_compose_services_share_mounts_user_env_and_limits():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert SERVICES <= set(services)
    for name in SERVICES | {"app"}:
        svc = services[name]
        assert svc["user"] == "${UID:-1000}:${GID:-1000}", name  # files on the mounts are the user's
        assert svc["env_file"] == [{"path": "${ENV_FILE:-.env}", "required": False}], name
        assert svc["mem_limit"] == "${MEM_LIMIT:-0}" and svc["cpus"] == "${CPUS:-0}", name
        assert "hf-cache:/cache/huggingface" in svc["volumes"], name
        if name != "test":
            assert {"./data:/app/data", "./models:/app/models"} <= set(svc["volumes"]), name
    assert services["setup"]["build"]["args"]["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.11-slim}"
    assert "hf-cache" in compose["volumes"]
    cuda = yaml.safe_load((REPO / "docker-compose.cuda.yml").read_text())["services"]
    assert cuda["setup"]["build"]["dockerfile"] == "Dockerfile.cuda"
    devices = cuda["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_images_keep_data_models_and_secrets_out_and_run_as_non_root():
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert ignore[0] == "*"  # allow-list: everything is out unless named
    allowed = [p for p in ignore if p.startswith("!")]
    assert not [p for p in allowed if p.split("/")[0].lstrip("!") in ("data", "models", ".venv", ".git", ".env")]
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (REPO / name).read_text()
        assert re.search(r"^USER 1000:1000$", text, re.M), name
        assert 'ENTRYPOINT ["python", "-m", "app"]' in text, name
        assert "ARG BASE_IMAGE=" in text and "ARG TORCH_INDEX_URL=" in text, name
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in (REPO / "Dockerfile").read_text()
