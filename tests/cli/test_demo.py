"""`make demo`'s pipeline carries a learning signal (issue 5), in a test-sized run.

The real demo (bench/demo.md) trains a from-scratch GLM for 15 minutes and scores held-out
sentences with unseen entities. Here, a 2-layer GLM from the same recipe (app.cli.demo.DEFAULTS:
METHOD=full, EVAL_METRIC=f1) trains on a handful of demo samples and is scored, through the same
templates, label masking, batched generation, JSON parsing and triplet scorer, on those samples:
F1 must climb from nothing to well above it. A break anywhere in that chain (a mask that hides
the answer, a template mismatch between training and generation, a parser that drops fenced
JSON) keeps F1 at 0.
"""

from __future__ import annotations

import json

from app import Config, FineTuner
from app.cli.demo import DEFAULTS, write_demo_data


def test_demo_recipe_f1_rises_well_above_its_start(tiny_glm_dir, tmp_path, monkeypatch, read_metrics):
    train, _ = write_demo_data(tmp_path / "data", 6, 4, seed=0)
    settings = {
        **DEFAULTS,
        "MODEL_NAME": str(tiny_glm_dir),
        "DATA_PATH": str(train),
        "VAL_PATH": str(train),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "BATCH_SIZE": 6,
        "LEARNING_RATE": 1e-2,
        "NUM_EPOCHS": 1000,
        "MAX_STEPS": 150,
        "EVAL_STEPS": 15,
        "EVAL_SAMPLES": 6,
        "SAVE_STEPS": 1000,
        "SEED": 0,
        "NUM_THREADS": 2,
        "PRECISION": "fp32",
    }
    monkeypatch.chdir(tmp_path)
    FineTuner(Config.from_dict(settings)).run()
    curve = [r["eval_f1"] for r in read_metrics(tmp_path / "out") if "eval_f1" in r]
    assert len(curve) == 10
    assert curve[0] <= 0.2 and max(curve) >= 0.8, curve


def test_demo_data_holds_out_unseen_subjects_and_mixes_in_copy_samples(tmp_path):
    from app.cli.demo import COPY_INSTRUCTION, sentence_of
    from app.data.synthetic import parse_target

    train, heldout = write_demo_data(tmp_path, 300, 20, seed=1, copy_fraction=0.5)
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    held = [json.loads(x) for x in heldout.read_text().splitlines()]
    copies = [r for r in rows if COPY_INSTRUCTION in r["context"]]
    extraction = [r for r in rows if COPY_INSTRUCTION not in r["context"]]
    assert len(extraction) == 300 and len(copies) == 150 and len(held) == 20
    assert all(r["target"] == sentence_of(r["context"]) and r["target"] in r["context"] for r in copies)
    sentences = {sentence_of(r["context"]) for r in extraction}
    assert all(r["target"] in sentences for r in copies)  # copies repeat training sentences only
    seen = {t[k] for r in extraction for t in parse_target(r["target"]) for k in ("subject", "object")}
    assert all(t["subject"] not in seen for r in held for t in parse_target(r["target"]))


def test_demo_model_is_rebuilt_when_its_dimensions_change(tmp_path, monkeypatch):
    import app.cli.demo as demo

    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "demo-glm")
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    monkeypatch.setattr(demo, "DEMO_DIMS", small)
    first = json.loads((demo.demo_model(0) / "config.json").read_text())
    assert first["num_hidden_layers"] == 1
    demo.demo_model(0)  # same dimensions: kept as it is
    assert json.loads((tmp_path / "demo-glm" / "config.json").read_text()) == first
    monkeypatch.setattr(demo, "DEMO_DIMS", {**small, "num_hidden_layers": 2})
    assert json.loads((demo.demo_model(0) / "config.json").read_text())["num_hidden_layers"] == 2


def test_demo_target_needs_f1_0_9_within_15_minutes():
    from app.cli.demo import reached_target

    rising = [(400.0, 1000, 0.5), (890.0, 2000, 0.93)]
    late = [(400.0, 1000, 0.5), (1200.0, 3000, 0.95)]
    assert reached_target(rising, {"triplet_f1": 0.85}, 15)  # on the curve within 900 s
    assert reached_target(late[:1], {"triplet_f1": 0.91}, 15)  # final score, 15-minute budget
    assert not reached_target(late, {"triplet_f1": 0.95}, 25)  # only after 15 minutes
    assert not reached_target(rising[:1], {"triplet_f1": 0.2}, 15)


def test_a_failed_demo_says_when_copying_formed_and_how_long_f1_had_after_it():
    from app.cli.demo import what_bounds

    line = what_bounds([(62, 400, 0.0), (380, 2400, 0.04), (437, 2800, 0.05), (704, 4688, 0.18)])
    assert "first left 0 at step 2400 (380 s)" in line and "the 324 s after it" in line, line
    assert "never left 0" in what_bounds([(62, 400, 0.0), (130, 800, 0.0)])


def test_time_budget_anneals_the_learning_rate_over_the_runs_last_share(monkeypatch):
    from types import SimpleNamespace

    import pytest

    import app.cli.demo as demo

    now = [0.0]
    monkeypatch.setattr(demo, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    args = SimpleNamespace(learning_rate=1e-3)

    def run(steps: int, points: list[tuple[float, int, float]]) -> SimpleNamespace:
        budget = demo.TimeBudget(100, cooldown=0.2)
        optimizer, scheduler = SimpleNamespace(param_groups=[{"lr": 1e-3}]), SimpleNamespace(base_lrs=[1e-3])
        control = SimpleNamespace(should_training_stop=False, should_evaluate=False)
        for t, step, lr in points:
            now[0] = t
            budget.on_step_end(
                args,
                SimpleNamespace(global_step=step, max_steps=steps),
                control,
                optimizer=optimizer,
                lr_scheduler=scheduler,
            )
            assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
            assert scheduler.base_lrs == [pytest.approx(lr)]
            assert not control.should_training_stop
        return control

    # the budget ends first: by time
    control = run(10_000, [(10, 100, 1e-3), (85, 850, 0.75e-3), (95, 950, 0.25e-3)])
    now[0] = 0
    late = demo.TimeBudget(100, cooldown=0.2)  # and past its end, the run stops
    now[0] = 101
    late.on_step_end(args, SimpleNamespace(global_step=1, max_steps=10), control)
    assert control.should_training_stop and control.should_evaluate
    # the data's one pass ends first: by steps
    run(1000, [(10, 100, 1e-3), (40, 850, 0.75e-3), (45, 950, 0.25e-3)])


def test_the_report_gives_the_batch_the_run_trained_with_under_the_tier(cli, tmp_path):
    """`make demo TIER=auto QUANT_LEVEL=auto`: the tier re-plans the batch (and the quantization, which METHOD=full
    turns off), and the report's header gives the samples per step the run used, as its train_config.json saved."""
    code, errors, _ = cli("demo", "DEMO_MINUTES=0.05", "TIER=auto", "QUANT_LEVEL=auto", "EVAL_STEPS=5")
    assert code == 0, errors
    saved = json.loads((tmp_path / "models" / "demo" / "train_config.json").read_text())
    report = (tmp_path / "bench" / "demo-0.05min.md").read_text()
    per_step = int(saved["BATCH_SIZE"]) * int(saved["GRAD_ACCUM"])
    assert f"METHOD=full, {per_step} samples per step" in report, (per_step, report[:400])
    assert report.rstrip().splitlines()[-1].startswith("What bounds it") or "-> PASS" in report
