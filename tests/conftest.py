"""Shared fixtures: the three tiny model families, built once per session in a temp dir.

Built with ``app.tiny.build_tiny_model`` (seeded, ~2 s each) so tests never touch or depend
on the repo's own ``models/`` directory.
"""
from __future__ import annotations

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
