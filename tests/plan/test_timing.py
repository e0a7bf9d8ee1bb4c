"""The expected time of a run (app/plan/train_timing.py): the FLOPs model's closed form and how it scales, the
calibration probes in each compute setting, the step count, and the line `make info` prints and `make train`
logs (with the prediction in summary.json). No test asserts a measured duration: only that probes return a
positive rate and that the arithmetic on top of them is what it says. The machine counts as idle (no wait for
a CPU) but where a test makes the probe measure nothing: a shared test machine is often busy."""

import json
import math
import re

import pytest
import torch

from app.config import Config
from app.plan import probes, train_timing
from app.plan.estimator import ModelShape, model_shape

LINE = re.compile(
    r"^expected ~[\d.,]+ (s|min|h|days) per optimizer step, ~[\d.,]+ (s|min|h|days) for \d+ steps "
    r"\(FLOPs model, probe [\d.,]+ GFLOP/s (fp32|bf16|fp16)( 8bit| 4bit)?\)$"
)


@pytest.fixture(scope="module")
def shape(tiny_glm_dir):
    return model_shape(str(tiny_glm_dir))


@pytest.fixture(autouse=True)
def idle(monkeypatch):
    """No run of a probe waited for a CPU: what these tests check does not depend on the machine's load."""
    monkeypatch.setattr(probes, "run_delay", lambda: 0.0)


def test_flops_scale_linearly_with_tokens(shape):
    one, two = (train_timing.micro_batch_flops(shape, b, 64, "lora", lora_r=8) for b in (2, 4))
    assert two.total == pytest.approx(2 * one.total)
    assert two.forward == pytest.approx(2 * one.forward) and two.backward == pytest.approx(2 * one.backward)
    short, long = (train_timing.micro_batch_flops(shape, 1, s, "lora") for s in (50, 100))
    assert long.linear == pytest.approx(2 * short.linear) and long.head == pytest.approx(2 * short.head)
    assert long.attention == pytest.approx(4 * short.attention)  # every token attends to the whole sample


def test_checkpointing_adds_exactly_one_forward_of_the_blocks(shape):
    off, on = (train_timing.micro_batch_flops(shape, 2, 128, "lora", ckpt, 8) for ckpt in (False, True))
    assert on.forward == off.forward and on.backward == off.backward
    assert on.total - off.total == pytest.approx(off.forward - off.head)  # the head is not recomputed
    assert sum(on.by_kind().values()) == pytest.approx(on.total)


def test_full_tuning_adds_the_weight_gradients(shape):
    lora, full = (train_timing.micro_batch_flops(shape, 2, 128, m) for m in ("lora", "full"))
    assert full.backward > lora.backward and full.forward == lora.forward
    assert full.backward - lora.backward == pytest.approx(lora.linear + lora.head)
    assert lora.backward == pytest.approx(lora.forward + lora.attention)  # frozen: input gradients only


def test_flops_of_a_known_shape_equal_the_closed_form():
    s = ModelShape(
        total_params=0,
        linear_params=1000,
        other_params=0,
        max_linear=0,
        lora_io=100,
        linear_in=0,
        layers=2,
        hidden=8,
        intermediate=16,
        vocab=50,
        heads=2,
        max_positions=64,
    )
    f = train_timing.micro_batch_flops(s, batch=2, seq=10, method="lora", lora_r=4)
    tokens = 2 * 10
    linear, attention = 2 * 1000 * tokens, 4 * 2 * 2 * 10**2 * 8
    head, adapter = 2 * 8 * 50 * tokens, 2 * 4 * 100 * tokens
    assert (f.linear, f.attention, f.head, f.adapter) == (linear, attention, head, adapter)
    assert f.forward == 84_800 and f.backward == (linear + head) + 2 * attention + 2 * adapter == 113_600
    assert f.total == 198_400
    assert train_timing.micro_batch_flops(s, 2, 10, "full", True).total == (linear + attention + head) + (
        2 * (linear + head) + 2 * attention
    ) + (linear + attention)


@pytest.mark.parametrize("quant, precision", [("none", "fp32"), ("none", "bf16"), ("8bit", "fp32"), ("4bit", "fp32")])
def test_each_probe_runs_in_its_setting_and_leaves_the_rng_alone(quant, precision):
    from app.models.quantization import bf16_supported

    if precision == "bf16" and not bf16_supported(False):
        pytest.skip("this CPU has no fast bf16")
    probes._CACHE.clear()
    before = torch.get_rng_state()
    rate = probes.probe_linear(quant, precision, 64, 192, 32, half_weights=precision == "bf16")
    assert math.isfinite(rate) and rate > 0
    assert probes.probe_linear(quant, precision, 64, 192, 32, half_weights=precision == "bf16") == rate  # cached
    assert probes.probe_linear("none", precision, 64, 192, 32, trainable=True) > 0
    assert probes.probe_attention(precision, 16, 32) > 0 and probes.probe_optimizer(5000) > 0
    assert probes.probe_glue(64, 96, 32, half=precision == "bf16") > 0
    assert torch.equal(torch.get_rng_state(), before)  # the run's seeded draws are unchanged


def test_a_model_sized_probe_is_capped():
    probes._CACHE.clear()
    assert probes.probe_linear("none", "fp32", 4096, 13696, 4096) > 0
    (key,) = probes._CACHE
    _, _, _, n_in, n_out, tokens, *_ = key
    assert n_in * n_out <= probes.PROBE_WEIGHTS["none"] and tokens == probes.PROBE_TOKENS
    assert n_out / n_in == pytest.approx(13696 / 4096, rel=0.05)  # the model's shape, scaled down


@pytest.mark.parametrize("half", [False, True])
def test_a_4bit_probe_layer_dequantizes_to_the_dtype_the_model_loads_in(half):
    # a 4-bit layer dequantizes to the dtype it was quantized from in every pass: quantized from fp32, a bf16
    # run's layer probed 1.6x slower than the model's own (the 9B 4-bit time estimate ran 32% long)
    from app.models.quantization import load_dtype

    layer = probes._quantized("4bit", torch.randn(192, 64), half, cuda=False)
    assert layer.weight.quant_state.dtype == load_dtype(half, False) == (torch.bfloat16 if half else torch.float32)


def _cfg(**values):
    return Config.from_dict({"QUANT_LEVEL": "none", "PRECISION": "fp32", **values})


def test_steps_count_as_the_trainer_counts_them():
    # as tests/cli/test_cli.py's end-to-end run: 18 samples, micro-batch 2, GRAD_ACCUM=2, one epoch -> 5 steps
    assert train_timing.optimizer_steps(_cfg(BATCH_SIZE=2, GRAD_ACCUM=2, NUM_EPOCHS=1), 18) == (5, 9)
    assert train_timing.optimizer_steps(_cfg(BATCH_SIZE=1, GRAD_ACCUM=16, NUM_EPOCHS=3), 18) == (6, 54)
    assert train_timing.optimizer_steps(_cfg(BATCH_SIZE=2, GRAD_ACCUM=4, MAX_STEPS=7), 1000) == (7, 28)
    assert train_timing.optimizer_steps(_cfg(BATCH_SIZE=2, GRAD_ACCUM=1, NUM_EPOCHS=1), 18, world_size=2) == (5, 5)


def test_the_estimate_adds_up_and_reads_as_one_line(shape):
    from app.plan.peak import trainable_params

    cfg = _cfg(BATCH_SIZE=2, GRAD_ACCUM=4, MAX_STEPS=3, MAX_SEQ_LEN=128)
    t = train_timing.predict_step_time(cfg, shape, train_samples=100, seq=96)
    optim = trainable_params(cfg, shape) * probes.probe_optimizer(trainable_params(cfg, shape))
    assert t.steps == 3 and t.step_s == pytest.approx(4 * t.micro_batch_s + optim)
    assert t.total_s == pytest.approx(3 * t.step_s)
    assert LINE.match(t.line()), t.line()
    assert t.setting == "fp32" and t.gflops > 0
    fields = t.summary(steps_run=3, seconds=6.0)
    assert fields["measured_step_s"] == 2.0 and fields["predicted_step_s"] == round(t.step_s, 3)
    assert fields["predicted_steps"] == 3
    assert t.tokens_per_step == 2 * 96 * 4 and fields["predicted_tokens_per_step"] == 768  # batch x seq x accum
    longer = train_timing.predict_step_time(cfg.replace({"GRAD_ACCUM": 8}), shape, train_samples=100, seq=96)
    assert longer.micro_batch_s == pytest.approx(t.micro_batch_s)  # same probes (cached), twice the micro-batches
    assert train_timing.predict_step_time(cfg.replace({"QUANT_LEVEL": "4bit"}), shape, 100).setting.endswith(" 4bit")


def test_durations_read_in_the_largest_sensible_unit():
    assert [train_timing.duration(s) for s in (0.42, 12.3, 126, 40 * 60, 3.5 * 3600, 2 * 86400)] == [
        "0.42 s",
        "12 s",
        "2.1 min",
        "40 min",
        "3.5 h",
        "2.0 days",
    ]


def test_lengths_of_a_micro_batch_packed_and_padded():
    rows = [{"input_ids": [0] * n, "labels": [-100] * (n - 2) + [1, 1]} for n in (10, 20, 30, 40)]
    seq, share = train_timing.batch_shape(rows, 2, packed=True)
    assert seq == 25 and share == pytest.approx(8 / 100)
    seq, share = train_timing.batch_shape(rows, 2, packed=False)  # E[longest of two draws with replacement]
    assert seq == pytest.approx((10 * 1 + 20 * 3 + 30 * 5 + 40 * 7) / 16) and share == 1.0
    assert train_timing.batch_shape(rows, 1, packed=False)[0] == 25 and train_timing.batch_shape([], 4, True) == (
        None,
        1.0,
    )


def test_info_prints_the_expected_time_beside_the_memory(tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys):
    from app.cli.info import run_info

    monkeypatch.chdir(tmp_path)
    run_info(
        Config.from_dict({"MODEL_NAME": str(tiny_glm_dir), "DATA_PATH": str(data_dir / "train.jsonl"), "MAX_STEPS": 4})
    )
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("predicted peak RSS:"))
    assert LINE.match(out[at + 2]), out  # after the memory breakdown, before any warning
    assert " for 4 steps " in out[at + 2]


def test_train_logs_the_expected_time_first_and_records_it(
    tiny_glm_dir, data_dir, tmp_path, monkeypatch, caplog, recipe
):
    import logging

    from app import FineTuner

    monkeypatch.chdir(tmp_path)
    cfg = recipe(tiny_glm_dir, data_dir, tmp_path / "out", MAX_STEPS=2, EVAL_STEPS=100, SAVE_STEPS=100, VAL_SIZE=0)
    with caplog.at_level(logging.INFO):
        result = FineTuner(cfg).run()
    messages = [r.getMessage() for r in caplog.records]
    at = next(i for i, m in enumerate(messages) if m.startswith("expected ~"))
    assert LINE.match(messages[at]) and " for 2 steps " in messages[at], messages[at]
    assert at < next(i for i, m in enumerate(messages) if m.startswith("LoRA r="))  # before the weights load
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["predicted_step_s"] > 0 and summary["predicted_total_s"] > 0 and summary["predicted_steps"] == 2
    assert summary["measured_step_s"] == round(result.seconds / 2, 3) and summary["probe_gflops"] > 0


# ---- issue 28: a probe that measured nothing gives no time ------------------------------------------------


def _nothing_measured(monkeypatch, how):
    monkeypatch.setattr(probes, "_CACHE", {})
    if how == "busy":  # every run's threads waited for a CPU longer than the run took: other processes ran
        waits = iter(range(0, 10**6, 10))
        monkeypatch.setattr(probes, "run_delay", lambda: float(next(waits)))
    else:  # the clock did not advance over any run
        monkeypatch.setattr(probes, "perf_counter", lambda: 100.0)


@pytest.mark.parametrize(
    "how, why",
    [
        ("busy", "this machine is busy: its threads spent the whole of each of"),
        ("clock", "runs took no measurable time: the clock did not advance"),
    ],
    ids=["busy", "clock"],
)
def test_a_probe_that_measured_nothing_gives_no_time(shape, monkeypatch, how, why):
    _nothing_measured(monkeypatch, how)
    with pytest.raises(probes.NothingMeasured, match=why.split(":")[0]):
        probes.probe_linear("none", "fp32", 64, 192, 32)
    t = train_timing.predict_step_time(_cfg(BATCH_SIZE=2, GRAD_ACCUM=4, MAX_STEPS=3), shape, train_samples=100)
    assert t.line().startswith("expected time: unknown for 3 steps: the probe measured nothing (") and why in t.line()
    assert "~" not in t.line() and "GFLOP/s" not in t.line(), t.line()  # no number built on it
    fields = t.summary(steps_run=3, seconds=6.0)
    assert fields["predicted_step_s"] is None and fields["predicted_total_s"] is None
    assert fields["probe_gflops"] is None and fields["measured_step_s"] == 2.0
    assert not probes._CACHE  # nothing kept: the next estimate probes again


def test_info_says_the_time_is_unknown_when_the_probe_measured_nothing(
    tiny_glm_dir, data_dir, tmp_path, monkeypatch, capsys
):
    from app.cli.info import run_info

    monkeypatch.chdir(tmp_path)
    _nothing_measured(monkeypatch, "busy")
    run_info(
        Config.from_dict({"MODEL_NAME": str(tiny_glm_dir), "DATA_PATH": str(data_dir / "train.jsonl"), "MAX_STEPS": 4})
    )
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("predicted peak RSS:"))
    assert out[at + 2].startswith(
        "expected time: unknown for 4 steps: the probe measured nothing (this machine is busy"
    ), out
    assert not any(line.startswith("expected ~") for line in out)


def test_a_slow_probe_reads_as_its_rate_not_zero():
    t = train_timing.StepTime(2.0, 5.7, 57.0, 10, 0.43, "fp32 8bit")
    assert "probe 0.43 GFLOP/s fp32 8bit" in t.line() and LINE.match(t.line())
    assert "probe 351 GFLOP/s" in train_timing.StepTime(2.0, 5.7, 57.0, 10, 351.2, "bf16").line()
