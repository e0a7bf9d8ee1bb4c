"""The memory guard: checkpoint, then back off (same effective batch) or stop; never an OOM kill."""

import json
import os

import pytest
from transformers import TrainerCallback

from app import FineTuner, UserError


class TripAt(TrainerCallback):
    """Feed the guard a reading at the limit once, as the sampler would near an OOM."""

    def __init__(self, ft, step):
        self.ft, self.step, self.done = ft, step, False

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step and not self.done:
            self.done = True
            self.ft.guard.on_sample(self.ft.guard.limit_mb)


@pytest.fixture
def guarded(tiny_glm_dir, data_dir, recipe):
    """guarded(out, **extra) -> the golden recipe at batch 4 x 1 for 4 steps, with the guard on."""

    def make(out, **extra):
        # A generous injected limit: only TripAt's reading can trip the guard.
        return recipe(
            tiny_glm_dir,
            data_dir,
            out,
            BATCH_SIZE=4,
            GRAD_ACCUM=1,
            MAX_STEPS=4,
            SAVE_STEPS=100,
            EVAL_STEPS=100,
            TIER="none",
            MEMORY_LIMIT_MB=10**6,
            **extra,
        )

    return make


def test_backoff_resumes_with_half_batch_and_the_same_losses(guarded, tmp_path, monkeypatch, caplog, train_losses):
    monkeypatch.chdir(tmp_path)
    plain = FineTuner(guarded(tmp_path / "plain")).run()
    ft = FineTuner(guarded(tmp_path / "guarded")).setup().prepare_data()
    result = ft.train(callbacks=[TripAt(ft, 2)])
    assert plain.steps == result.steps == 4
    summary = json.loads((tmp_path / "guarded" / "summary.json").read_text())
    assert (summary["plan"]["BATCH_SIZE"], summary["plan"]["GRAD_ACCUM"]) == (2, 2)  # effective batch 4 kept
    assert "memory guard: BATCH_SIZE -> 2" in caplog.text
    # Same samples per optimizer step and token-weighted loss: the run continues as if nothing happened.
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "guarded")
    assert [b[s] for s in range(1, 5)] == pytest.approx([a[s] for s in range(1, 5)], rel=1e-4)


def test_stop_mode_ends_with_a_checkpoint_and_one_clear_error(guarded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ft = FineTuner(guarded(tmp_path / "out", MEMORY_GUARD="stop"))
    ft.setup().prepare_data()
    with pytest.raises(UserError) as err:
        ft.train(callbacks=[TripAt(ft, 1)])
    msg = str(err.value)
    assert msg.startswith("memory:") and "checkpoint-2" in msg and "MAX_SEQ_LEN" in msg and "\n" not in msg
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def _train_cli(run_app, data_dir, out, cgroup, limit_mb, guard):
    args = [
        "MODEL_NAME=tiny",
        f"DATA_PATH={data_dir / 'long.jsonl'}",
        f"OUTPUT_DIR={out}",
        "QUANT_LEVEL=none",
        "TIER=none",
        "BATCH_SIZE=64",
        "GRAD_ACCUM=1",
        "MAX_SEQ_LEN=512",
        "MAX_STEPS=2",
        "VAL_SIZE=0",
        f"MEMORY_GUARD={guard}",
    ]
    if cgroup is None:
        args.append(f"MEMORY_LIMIT_MB={limit_mb}")
    procs = None if cgroup is None else cgroup / "cgroup.procs"

    def enter():
        if procs is not None:
            procs.write_text(str(os.getpid()))

    return run_app(["train", *args], preexec_fn=enter, timeout=600)


def test_naive_config_over_a_real_limit_finishes_instead_of_being_killed(data_dir, tmp_path, memory_cgroup, run_app):
    """BATCH_SIZE=64 x 512 tokens needs ~1.8 GB; the limit is 1.2 GB (a real cgroup where we can)."""
    from app.data.synthetic import generate_samples

    long = [{"text": "".join(s["context"] + s["target"] for s in generate_samples(12, seed=i))} for i in range(64)]
    (data_dir / "long.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in long) + "\n")
    limit = 1200
    cgroup = memory_cgroup(limit)
    naive = _train_cli(run_app, data_dir, tmp_path / "naive", cgroup, limit, "off")
    guarded_run = _train_cli(run_app, data_dir, tmp_path / "out", cgroup, limit, "backoff")
    if cgroup is not None:  # the kernel really kills the unguarded run
        assert naive.returncode in (-9, 137), naive.stderr[-1500:]
    else:  # with an injected limit nothing kills it, but it does go over
        assert json.loads((tmp_path / "naive" / "summary.json").read_text())["peak_rss_mb"] > limit
    assert guarded_run.returncode == 0, guarded_run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "memory guard" in guarded_run.stderr
    plan = summary["plan"]
    assert plan["BATCH_SIZE"] < 64 and plan["BATCH_SIZE"] * plan["GRAD_ACCUM"] == 64
    assert summary["peak_rss_mb"] < limit
