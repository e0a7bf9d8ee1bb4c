"""Every training option under every weight format the tier can pick: each trains a step or is refused in one
line, never a traceback. Given as QUANT_LEVEL, each (option, format) is trained or refused through the command
line; left to the tier, the plan must pick a format the option trains on, and say so in one line where that is
not the tier's. The tier's pick is planning only (the training it leads to is one of the walk's), so it is
checked on the plan, and the issue's run (USE_DORA under the 12-24 GB tier's 8bit) end to end."""

from __future__ import annotations

import json
import logging

import pytest

OPTIONS = {
    "lora": (),
    "dora": ("USE_DORA=true",),
    "rslora": ("USE_RSLORA=true",),
    "gaussian": ("LORA_INIT=gaussian",),
    "pissa": ("LORA_INIT=pissa",),
    "olora": ("LORA_INIT=olora",),
    "loftq": ("LORA_INIT=loftq",),
    "neftune": ("NEFTUNE_ALPHA=5",),
    "qlora": ("METHOD=qlora",),
    "ptuning": ("METHOD=ptuning",),
    "full": ("METHOD=full",),
}
LEVELS = ("none", "8bit", "4bit")
# the one format an option works with (PiSSA/OLoRA rewrite the base's weights, LoftQ fits a 4-bit base's error,
# QLoRA is LoRA on 4 bits, full tuning trains every weight); every other option trains on each format
NEEDS = {"pissa": "none", "olora": "none", "loftq": "4bit", "qlora": "4bit", "full": "none"}


def _tier_for(level: str) -> str:
    """A CPU tier whose QUANT_LEVEL is ``level``, from the tier table itself."""
    from app.plan.tiers import CPU_TIERS

    return next(t.name for _, t in CPU_TIERS if t.quant == level)


def _train(cli, model, data, out, *args):
    """One optimizer step of two micro-batches: DoRA on 8bit failed in the second forward (the tier's batch and
    sample count would only cost time)."""
    return cli(
        "train",
        f"MODEL_NAME={model}",
        f"DATA_PATH={data}",
        f"OUTPUT_DIR={out}",
        "MAX_STEPS=1",
        "BATCH_SIZE=1",
        "GRAD_ACCUM=2",
        "MAX_SAMPLES=8",
        "VAL_SIZE=0",
        "NUM_THREADS=2",
        *args,
    )


def _saved_quant(out) -> str:
    return json.loads((out / "train_config.json").read_text())["QUANT_LEVEL"]


@pytest.fixture(scope="module")
def data(make_data):
    return make_data(n_train=8, n_dev=2) / "train.jsonl"


def test_each_option_under_each_given_quant_level_trains_a_step_or_is_refused_in_one_line(
    cli, tiny_glm_dir, data, tmp_path
):
    """All cells in one process, every wrong one reported together (DoRA on 8bit was a bitsandbytes traceback)."""
    from app.plan.tiers import CPU_TIERS, GPU_TIERS

    assert {t.quant for _, t in CPU_TIERS + GPU_TIERS} == set(LEVELS)  # every format a tier can pick is walked
    wrong = {}
    for option, args in OPTIONS.items():
        for level in LEVELS:
            out = tmp_path / f"{option}-{level}"
            try:
                code, errors, stderr = _train(cli, tiny_glm_dir, data, out, *args, f"QUANT_LEVEL={level}")
            except Exception as e:  # noqa: BLE001 - a traceback in the CLI: a wrong cell, all reported together
                wrong[option, level] = f"Traceback: {type(e).__name__}: {e}"
                continue
            if NEEDS.get(option, level) != level:  # refused: one line naming both settings, nothing written
                ok = (
                    code == 2
                    and len(errors) == 1
                    and args[0] in errors[0]
                    and f"QUANT_LEVEL={level}" in errors[0]
                    and not out.exists()
                )
            else:
                ok = code == 0 and not errors and _saved_quant(out) == level
            if not ok or "Traceback" in stderr:
                wrong[option, level] = f"exit {code}: {errors}"
    assert not wrong, wrong


def test_left_to_the_tier_each_option_gets_a_format_it_trains_on_and_a_line_says_why(caplog):
    """The pick is what the walk above trains (or the tier's own format); where it is not the tier's, one INFO line
    names it, the tier's, the option that needs it and the change that keeps the tier's."""
    from app.config import Config
    from app.plan.resources import Resources
    from app.plan.tiers import apply_tier

    machine = Resources(64 * 1024, 64 * 1024, 64 * 1024, "host", 2, "affinity", [])  # TIER=name decides
    wrong = {}
    for option, args in OPTIONS.items():
        for tiers in LEVELS:
            tier = _tier_for(tiers)
            values = dict(a.split("=", 1) for a in args)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="app.plan.tiers"):
                plan = apply_tier(Config.from_dict({"MODEL_NAME": "tiny", "TIER": tier, **values}), machine)
            level, why = plan.decisions["QUANT_LEVEL"]
            said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("QUANT_LEVEL=")]
            want = NEEDS.get(option, tiers)
            ok = level == want and why == (args[0] if option in NEEDS else f"TIER={tier}")
            if want == tiers:
                ok = ok and not said
            else:
                ok = (
                    ok
                    and len(said) == 1
                    and said[0].startswith(f"QUANT_LEVEL={want} instead of tier {tier}'s {tiers}: {args[0]} ")
                    and said[0].endswith(f"keeps {tiers}")
                )
            if not ok:
                wrong[option, tier] = (level, why, said)
    assert not wrong, wrong


def test_the_issues_run_dora_under_the_tiers_8bit_trains(cli, tiny_glm_dir, data, tmp_path):
    """`make train MODEL_NAME=tiny USE_DORA=true` on a 12-24 GB machine (tier cpu-m, 8bit)."""
    code, errors, stderr = _train(cli, tiny_glm_dir, data, tmp_path / "out", "USE_DORA=true", "TIER=cpu-m")
    assert code == 0 and not errors and "Traceback" not in stderr
    assert _saved_quant(tmp_path / "out") == "8bit"


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["METHOD=ptuning", "GRADIENT_CHECKPOINTING=on"],
            "GRADIENT_CHECKPOINTING=on cannot run METHOD=ptuning (PEFT passes no P-Tuning prefix through checkpointed "
            "layers); use GRADIENT_CHECKPOINTING=auto or off, or METHOD=lora",
        ),
        (
            ["LORA_INIT=loftq", "PRECISION=bf16"],
            "LORA_INIT=loftq needs a 4-bit base, but PRECISION=bf16 autocast is for unquantized weights; use "
            "PRECISION=auto, or another LORA_INIT",
        ),
    ],
)
def test_a_pair_that_cannot_train_together_is_refused_in_one_line(cli, args, line):
    """P-Tuning under checkpointed layers was a ValueError from PEFT after loading; LoftQ under bf16 autocast was
    refused only after loading, with a fix (QUANT_LEVEL=4bit) that PRECISION=bf16 then refused."""
    code, errors, stderr = cli("train", "MODEL_NAME=tiny", *args)
    assert code == 2 and errors == [line] and "Traceback" not in stderr
