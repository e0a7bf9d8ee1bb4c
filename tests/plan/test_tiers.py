"""Tiers, the memory plan and the estimator: explicit settings always win, the plan fits the budget."""

import pytest

from app.config import Config
from app.plan.estimator import estimate, model_shape
from app.plan.resources import GPUInfo, Resources
from app.plan.tiers import apply_tier, fit_memory, seq_from_lengths

GB = 1024


def res(ram_gb, avail_gb=None, gpu_gb=None):
    gpus = [GPUInfo(0, "Fake GPU", gpu_gb * GB, gpu_gb * GB, True)] if gpu_gb else []
    return Resources(ram_gb * GB, (avail_gb or ram_gb) * GB, 64 * GB, "cgroup v2", 4, "affinity", gpus)


def cfg(**values):
    return Config.from_dict({"MODEL_NAME": "tiny", **values})


@pytest.mark.parametrize(
    "ram, tier, quant, samples, batch, accum",
    [
        (4, "cpu-xs", "4bit", 30, 1, 32),
        (8, "cpu-s", "4bit", 200, 1, 16),
        (16, "cpu-m", "8bit", 800, 2, 8),
        (32, "cpu-l", "none", 2000, 4, 4),
    ],
)
def test_cpu_tiers_follow_the_table(ram, tier, quant, samples, batch, accum):
    c = cfg()
    plan = apply_tier(c, res(ram))
    assert plan.tier == tier and plan.device == "cpu"
    p = plan.cfg
    assert (p.resources.quant_level, p.data.max_samples, p.train.batch_size, p.train.grad_accum) == (
        quant,
        samples,
        batch,
        accum,
    )
    assert c == cfg()  # the user's settings are never changed: the plan holds its own


# Each bound on both sides: 1 MB below it is the smaller tier, exactly at it is the next one
# (the table's bounds are exclusive upper bounds: ``gb < bound``).
JUST_BELOW = 1 / GB  # 1 MB in GB


@pytest.mark.parametrize(
    "ram, tier",
    [
        (6 - JUST_BELOW, "cpu-xs"),
        (6, "cpu-s"),
        (12 - JUST_BELOW, "cpu-s"),
        (12, "cpu-m"),
        (24 - JUST_BELOW, "cpu-m"),
        (24, "cpu-l"),
    ],
)
def test_cpu_tier_bounds_are_6_12_24_gb_of_ram_exclusive(ram, tier):
    plan = apply_tier(cfg(), res(ram))
    assert (plan.tier, plan.device) == (tier, "cpu")


@pytest.mark.parametrize(
    "vram, tier", [(12 - JUST_BELOW, "gpu-s"), (12, "gpu-m"), (24 - JUST_BELOW, "gpu-m"), (24, "gpu-l")]
)
def test_gpu_tier_bounds_are_12_24_gb_of_vram_exclusive(vram, tier):
    plan = apply_tier(cfg(), res(64, gpu_gb=vram))  # RAM plays no part once there is a GPU
    assert (plan.tier, plan.device) == (tier, "cuda")


@pytest.mark.parametrize("vram, tier, rank", [(8, "gpu-s", 8), (16, "gpu-m", 16), (80, "gpu-l", 32)])
def test_gpu_tiers_by_vram_set_the_lora_rank(vram, tier, rank):
    c = cfg()
    plan = apply_tier(c, res(16, gpu_gb=vram))
    assert (plan.tier, plan.device, plan.cfg.lora.lora_r, plan.cfg.lora.lora_alpha) == (tier, "cuda", rank, 2 * rank)


def test_explicit_settings_win_over_the_tier_and_forced_tier():
    c = cfg(BATCH_SIZE=3, QUANT_LEVEL="none", TIER="cpu-xs")
    plan = apply_tier(c, res(64))
    assert plan.tier == "cpu-xs"
    assert (plan.cfg.train.batch_size, plan.cfg.resources.quant_level) == (3, "none")
    assert plan.decisions["BATCH_SIZE"] == (3, "set by you")
    assert plan.cfg.train.grad_accum == 32 and "TIER=cpu-xs" in plan.decisions["GRAD_ACCUM"][1]


def test_qlora_means_4bit_and_tier_none_keeps_defaults():
    assert apply_tier(cfg(METHOD="qlora"), res(64)).cfg.resources.quant_level == "4bit"
    plain = apply_tier(cfg(TIER="none"), res(4)).cfg
    assert (plain.train.batch_size, plain.train.grad_accum, plain.resources.quant_level) == (1, 8, "none")


def test_sequence_length_comes_from_the_data_not_the_table(tiny_glm_dir):
    lengths = list(range(100, 300))  # p95 = 290 -> rounded up to 304
    assert seq_from_lengths(lengths, 4096) == 304
    assert seq_from_lengths(lengths, 256) == 256  # never beyond the model's positions
    c = cfg()
    shape = model_shape(str(tiny_glm_dir))
    plan = fit_memory(apply_tier(c, res(4)), res(4), shape, lengths)
    assert plan.cfg.data.max_seq_len == 304 and "95%" in plan.decisions["MAX_SEQ_LEN"][1]


def test_fit_memory_shrinks_until_the_prediction_fits(tiny_glm_dir):
    shape = model_shape(str(tiny_glm_dir))
    c = cfg(TIER="cpu-l", MAX_SEQ_LEN=1024)  # batch 4 x 1024 tokens; explicit seq stays
    plan = apply_tier(c, res(64))
    big = estimate(shape, "none", 8, 4, 1024, False).total_mb
    small_budget_avail = (estimate(shape, "none", 8, 1, 1024, False).total_mb + 5) / 0.85 / GB
    plan = fit_memory(plan, res(64, avail_gb=small_budget_avail), shape, None)
    p = plan.cfg
    assert p.train.batch_size == 1 and p.train.grad_accum == 16  # effective batch 16 kept
    assert p.data.max_seq_len == 1024 and plan.estimate.total_mb <= plan.budget_mb < big
    assert not plan.warnings


def test_impossible_budget_warns_with_the_fix(tiny_glm_dir):
    shape = model_shape(str(tiny_glm_dir))
    c = cfg(MAX_SEQ_LEN=512, BATCH_SIZE=1, QUANT_LEVEL="4bit")
    fixed = estimate(shape, "4bit", 8, 1, 512, True)
    fixed = fixed.total_mb - fixed.activations_mb - fixed.logits_mb  # fits; the activations and logits do not
    plan = fit_memory(apply_tier(c, res(1)), res(1, avail_gb=(fixed + 2) / GB), shape, None)
    assert plan.cfg.resources.gradient_checkpointing == "on"  # tried what it could
    assert plan.warnings and "exceeds the budget" in plan.warnings[0] and "MAX_SEQ_LEN" in plan.warnings[0]


@pytest.mark.parametrize("guard", ["backoff", "stop", "off"])
def test_weights_that_cannot_fit_stop_before_loading_in_one_line(tiny_glm_dir, guard):
    # nothing the plan shrinks makes the weights smaller: loading would be killed (9B 4-bit in 8 GB)
    from app.core.errors import UserError

    shape = model_shape(str(tiny_glm_dir))
    c = cfg(QUANT_LEVEL="4bit", MEMORY_GUARD=guard)
    e = estimate(shape, "4bit", 8, 1, 64, True)
    short = res(1, avail_gb=(e.total_mb - e.activations_mb - e.logits_mb - 2) / GB)
    if guard == "off":  # the user's say-so: load anyway, with the budget warning
        assert "exceeds the budget" in fit_memory(apply_tier(c, short), short, shape, None).warnings[0]
        return
    with pytest.raises(UserError) as err:
        fit_memory(apply_tier(c, short), short, shape, None)
    line = str(err.value)
    assert "\n" not in line and "MODEL_NAME=tiny" in line and "QUANT_LEVEL=4bit" in line
    assert "MEMORY_GUARD=off" in line and "cgroup v2" in line


def test_estimator_orders_and_scales(tiny_qwen2_dir):
    shape = model_shape(str(tiny_qwen2_dir))
    assert shape.layers == 2 and shape.hidden == 64 and shape.total_params > shape.linear_params > 0
    e = {q: estimate(shape, q, 8, 2, 256, False) for q in ("none", "8bit", "4bit")}
    assert e["4bit"].weights_mb < e["8bit"].weights_mb < e["none"].weights_mb
    assert estimate(shape, "none", 8, 4, 256, False).activations_mb == pytest.approx(2 * e["none"].activations_mb)
    assert estimate(shape, "none", 8, 2, 256, True).activations_mb < e["none"].activations_mb
    assert estimate(shape, "none", 16, 2, 256, False).trainable_mb == pytest.approx(2 * e["none"].trainable_mb)
    gpu = estimate(shape, "none", 8, 2, 256, False, cuda=True)
    assert gpu.weights_mb == pytest.approx(e["none"].weights_mb / 2)  # bf16 on GPU


def test_planning_never_changes_the_users_config(tiny_glm_dir, tmp_path, write_dataset):
    """A Config is frozen: the tier, the data's lengths and the memory fit make new ones (FineTuner.cfg,
    plan.cfg), so a notebook that reuses its Config for a second run starts from what it set, not from
    the first run's plan (GRADIENT_CHECKPOINTING=auto used to come back as 'off')."""
    import dataclasses

    from app import FineTuner

    write_dataset(tmp_path, n_train=20, n_dev=2, seed=1)
    user = cfg(MODEL_NAME=str(tiny_glm_dir), DATA_PATH=str(tmp_path / "train.jsonl"), OUTPUT_DIR=str(tmp_path / "o"))
    before = user.to_dict()
    ft = FineTuner(user).setup().prepare_data()
    assert user.to_dict() == before and user.resources.gradient_checkpointing == "auto"
    assert ft.cfg is ft.plan.cfg and ft.cfg.resources.gradient_checkpointing in ("on", "off")
    assert ft.cfg.data.max_seq_len != before["MAX_SEQ_LEN"] and "95%" in ft.plan.decisions["MAX_SEQ_LEN"][1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        user.train.batch_size = 2  # type: ignore[misc]
    # the Plan too: each step returns a new one, the one before stays as it was
    first = ft.plan
    later = first.set("BATCH_SIZE", 7, "test").warn("w")
    assert later.cfg.train.batch_size == 7 and later.warnings[-1] == "w" and later.decisions["BATCH_SIZE"][1] == "test"
    assert (
        first.cfg.train.batch_size != 7
        and "w" not in first.warnings
        and first.decisions.get("BATCH_SIZE") != (7, "test")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.tier = "cpu-xs"  # type: ignore[misc]
    with pytest.raises(TypeError):
        first.decisions["BATCH_SIZE"] = (1, "x")  # type: ignore[index]


@pytest.mark.parametrize("init, ram, quant", [("pissa", 8, "none"), ("olora", 16, "none"), ("loftq", 32, "4bit")])
def test_a_lora_init_that_needs_a_weight_format_gets_it_when_quant_is_left_to_the_tier(init, ram, quant):
    """The tier would pick 4bit / 8bit / none at 8 / 16 / 32 GB: PiSSA and OLoRA rewrite the base's weights (so
    none), LoftQ needs a 4-bit base; an explicit QUANT_LEVEL is validated instead
    (tests/models/test_lora_variants.py)."""
    for tier in ("auto", "none"):
        plan = apply_tier(cfg(LORA_INIT=init, TIER=tier), res(ram))
        assert plan.cfg.resources.quant_level == quant, (tier, plan.cfg.resources.quant_level)


# about a 1.5B model: big enough that 8-bit weights save more than the runtime they cost (the tiny one is not)
BIG = dict(
    total_params=1_600_000_000,
    linear_params=1_300_000_000,
    other_params=300_000_000,
    max_linear=30_000_000,
    lora_io=28 * (2048 * 4 + 8192 * 3),
    linear_in=2048 * 4 + 8192,
    layers=28,
    hidden=2048,
    intermediate=8192,
    vocab=150_000,
    heads=16,
    max_positions=8192,
)


def test_the_memory_fit_keeps_a_format_another_setting_needs():
    """Quantizing further to fit is the plan's choice, but not into a format a setting cannot train on: PiSSA and
    OLoRA rewrite the base's weights and bf16 autocast runs unquantized ones, so they stay at none (and the
    warning does not offer QUANT_LEVEL=4bit), where plain LoRA and DoRA go to 8bit."""
    from app.plan.estimator import ModelShape

    shape = ModelShape(**BIG)
    fits_8bit = estimate(shape, "8bit", 8, 1, 512, True).total_mb
    assert fits_8bit < estimate(shape, "none", 8, 1, 512, True).total_mb
    tight = res(64, avail_gb=(fits_8bit + 1) / 0.85 / GB)
    for setting in ("", "USE_DORA=true", "LORA_INIT=pissa", "LORA_INIT=olora", "PRECISION=bf16"):
        values = dict([setting.split("=")]) if setting else {}
        plan = fit_memory(
            apply_tier(cfg(TIER="cpu-l", MAX_SEQ_LEN=512, BATCH_SIZE=1, **values), tight), tight, shape, None
        )
        if setting in ("", "USE_DORA=true"):
            assert plan.decisions["QUANT_LEVEL"] == ("8bit", "needed to fit memory") and not plan.warnings, setting
        else:
            assert plan.decisions["QUANT_LEVEL"] == ("none", setting), (setting, plan.decisions["QUANT_LEVEL"])
            assert plan.warnings and "QUANT_LEVEL" not in plan.warnings[0], plan.warnings


def test_the_memory_fit_never_checkpoints_p_tuning():
    """PEFT runs no P-Tuning prefix through checkpointed layers (a ValueError after loading): the fit halves the
    batch and quantizes instead, where it would turn checkpointing on for LoRA."""
    from app.plan.estimator import ModelShape

    shape = ModelShape(**BIG)
    fits = estimate(shape, "8bit", 8, 1, 512, False, trainable_params=0).total_mb
    tight = res(64, avail_gb=fits / 0.85 / GB)
    lora = fit_memory(apply_tier(cfg(TIER="cpu-l", MAX_SEQ_LEN=512), tight), tight, shape, None)
    assert lora.cfg.resources.gradient_checkpointing == "on"
    plan = fit_memory(apply_tier(cfg(TIER="cpu-l", MAX_SEQ_LEN=512, METHOD="ptuning"), tight), tight, shape, None)
    assert plan.cfg.resources.gradient_checkpointing == "off" and plan.cfg.resources.quant_level != "none"
    assert all("GRADIENT_CHECKPOINTING" not in w for w in plan.warnings)


@pytest.mark.parametrize("cuda", [False, True])
def test_full_tuning_counts_each_trained_weight_once(cuda, monkeypatch):
    """METHOD=full: the weights are the fp32 parameters AdamW's 16 bytes (param, grad, two moments) already count.
    The estimate counted their 4 bytes twice: 3,217 MB predicted for a 125M Qwen2 run that peaked at 2,766 MB
    RSS (now 2,741 for 2,738). A full DPO run's frozen reference adds one copy in the frozen dtype (bf16 on a
    GPU that has it)."""
    import torch

    from app.plan.estimator import ModelShape
    from app.plan.peak import predict_peak

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    shape = ModelShape(**BIG)
    e = predict_peak(cfg(METHOD="full", QUANT_LEVEL="none"), shape, cuda)
    assert e.weights_mb + e.trainable_mb == pytest.approx(shape.total_params * 16 / 2**20)
    ref = predict_peak(cfg(METHOD="full", QUANT_LEVEL="none", STAGE="dpo"), shape, cuda)
    frozen = estimate(shape, "none", 8, 1, 512, False, cuda=cuda).weights_mb  # LoRA's base: the frozen dtype
    assert ref.weights_mb == pytest.approx(e.weights_mb + frozen)
