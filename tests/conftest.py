"""Shared fixtures: the three tiny model families, built once per session in a temp dir.

Built with ``app.tiny.build_tiny_model`` (seeded, ~2 s each) so tests never touch or depend
on the repo's own ``models/`` directory.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest


def _build(tmp_path_factory, name):
    from app.tiny import build_tiny_model

    return build_tiny_model(name, tmp_path_factory.mktemp("tiny-models") / name)


@pytest.fixture(scope="session")
def tiny_glm_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _build(tmp_path_factory, "tiny-llama")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def glm_tok(tiny_glm_dir):
    return _tokenizer(tiny_glm_dir)


@pytest.fixture(scope="session")
def qwen2_tok(tiny_qwen2_dir):
    return _tokenizer(tiny_qwen2_dir)


@pytest.fixture(scope="session")
def llama_tok(tiny_llama_dir):
    return _tokenizer(tiny_llama_dir)


@pytest.fixture
def memory_cgroup():
    """make(limit_mb) -> a real child memory cgroup (v1 or v2) with that limit, or None where this
    process may not create one (not root, no writable cgroupfs); tests then inject MEMORY_LIMIT_MB.
    A child process joins it by writing its pid to <dir>/cgroup.procs. Removed afterwards."""
    made = []

    def make(limit_mb):
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
            v1 = next((ln.split(":", 2)[2] for ln in lines if ":memory:" in ln), None)
            base = Path("/sys/fs/cgroup/memory") if v1 is not None else Path("/sys/fs/cgroup")
            rel = v1 if v1 is not None else next(ln.split(":", 2)[2] for ln in lines if ln.startswith("0::"))
            path = base / rel.lstrip("/") / f"cpu-trainer-test-{uuid.uuid4().hex[:8]}"
            path.mkdir()
            made.append(path)
            (path / ("memory.limit_in_bytes" if v1 is not None else "memory.max")).write_text(str(limit_mb * 2**20))
            return path
        except (OSError, StopIteration):
            return None

    yield make
    for path in made:
        try:
            path.rmdir()
        except OSError:
            pass
