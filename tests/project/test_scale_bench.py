"""`make bench-scale`'s own parts, at a tiny size: the layer-by-layer model builder, the memory cgroup
that judges "never killed", and the report's reading of the progress bar."""

import json
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

import bench.scale_models as scale_models
from bench.scale_report import eta_after_first_step

SMALL = {
    **scale_models.CHATGLM3_6B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "head_dim": 32,
    "vocab_size": 4096,
}


@pytest.fixture
def small_shape(monkeypatch, tmp_path, tiny_glm_dir):
    monkeypatch.setitem(scale_models.SHAPES, "small", SMALL)
    monkeypatch.setattr(scale_models, "SHARD_BYTES", 300_000)  # several shards, as 6B has 6
    shutil.copytree(tiny_glm_dir, tmp_path / "tiny-glm")  # the tokenizer it borrows
    return tmp_path


def test_random_glm_is_written_in_shards_that_transformers_loads_whole(small_shape):
    import torch
    from transformers import AutoModelForCausalLM

    out = scale_models.build_random_glm("small", small_shape)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert set(index["weight_map"]) == set(model.state_dict())  # every weight written, none missing
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == 4096
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    std = model.model.layers[2].mlp.down_proj.weight.float().std().item()
    assert 0.018 < std < 0.022
    assert not [p for p in small_shape.iterdir() if p.name.startswith(".")]  # no temporary dir left
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert scale_models.build_random_glm("small", small_shape) == out  # built once, then reused
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_random_glm_that_does_not_fit_on_disk_is_one_line_and_writes_nothing(small_shape, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scale_models.shutil, "disk_usage", lambda _p: usage(10**9, 10**9, 10**6))
    with pytest.raises(SystemExit, match=r"small needs [\d.]+ GB of disk .* GB free; free some space"):
        scale_models.build_random_glm("small", small_shape)
    assert sorted(p.name for p in small_shape.iterdir()) == ["tiny-glm"]


def test_a_cgroup_counts_the_kernels_oom_kill():
    """What the bench's "never killed" verdict reads: a child over its limit is killed by the kernel
    and the cgroup counts it; one under its limit is not."""
    from app.core import cgroups

    cg = cgroups.create(100, prefix="cpu-trainer-test")
    if cg is None:
        pytest.skip("needs a writable memory cgroup (root): the kernel's OOM killer is the resource under test")
    try:
        hog = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
        killed = subprocess.run([sys.executable, "-c", hog], preexec_fn=cg.join, capture_output=True)
        assert killed.returncode == -9 and cg.oom_kills() == 1
        fine = subprocess.run([sys.executable, "-c", "b = bytearray(10 * 2**20)"], preexec_fn=cg.join)
        assert fine.returncode == 0 and cg.oom_kills() == 1
        assert 90 <= cg.peak_mb() <= 100.5
    finally:
        cg.remove()


def test_eta_after_the_first_step_is_read_from_the_progress_bar():
    log = (
        "train:   0%|          | 0/3 [00:00<?, ?step/s]train:  33%|███▎      | 1/3 [00:26<00:52, 26.34s/step]"
        "train:  67%|██████▋   | 2/3 [00:47<00:23, 23.21s/step]"
    )
    assert eta_after_first_step(log) == (26.0, 52.0)
    assert eta_after_first_step("train:  33%|███▎      | 1/30 [1:02:03<2:04:06, 3723s/step]") == (3723.0, 7446.0)
    assert eta_after_first_step("no bar here") is None
