"""Tiers never sample the user's data down silently (issue 14, item 5): a tier's MAX_SAMPLES that
leaves records out is a WARNING at the start, again at the end, and in summary.json, naming how
many records of how many, why, and the fix; a MAX_SAMPLES the user set is only noted."""

import json
import logging

from app.config import Config
from app.training.train import FineTuner


def _cfg(tiny_glm_dir, data, **extra):
    values = {
        "MODEL_NAME": str(tiny_glm_dir),
        "DATA_PATH": str(data),
        "OUTPUT_DIR": "out",
        "MEMORY_LIMIT_MB": 8192,
        "QUANT_LEVEL": "none",
        "PRECISION": "fp32",
        "MAX_STEPS": 1,
        "GRAD_ACCUM": 1,
        "SAVE_STEPS": 100,
        "EVAL_STEPS": 100,
        "NUM_THREADS": 2,
    }
    values.update(extra)
    return Config.from_dict(values)


def test_tier_that_leaves_records_out_warns_at_start_end_and_in_summary(
    tmp_path, monkeypatch, caplog, tiny_glm_dir, write_dataset
):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "d", n_train=400, n_dev=2, seed=1)
    ft = FineTuner(_cfg(tiny_glm_dir, tmp_path / "d" / "train.jsonl"))
    with caplog.at_level(logging.INFO):
        ft.setup().prepare_data()
    assert ft.plan.tier == "cpu-s" and ft.cfg.data.max_samples == 200
    start = [r.message for r in caplog.records if r.levelno == logging.WARNING and "valid records" in r.message]
    assert len(start) == 1, start
    assert "using 200 of its 400 valid records" in start[0] and "RAM 8.0 GB -> tier cpu-s" in start[0]
    assert "180 of them held out" not in start[0] and "20 of them held out for validation" in start[0]
    assert "200 records are left out" in start[0] and "MAX_SAMPLES=all" in start[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ft.train()
    end = [r.message for r in caplog.records if r.levelno == logging.WARNING and "valid records" in r.message]
    assert end and "trained on 200 of the 400 valid records" in end[-1] and "MAX_SAMPLES=all" in end[-1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["records"] == {
        "valid": 400,
        "used": 200,
        "train": 180,
        "validation": 20,
        "left_out": 200,
        "max_samples": 200,
        "why": "RAM 8.0 GB -> tier cpu-s",
    }
    assert any("using 200 of its 400 valid records" in w for w in summary["warnings"])


def test_max_samples_all_or_set_by_the_user_is_no_warning(tmp_path, monkeypatch, caplog, tiny_glm_dir, write_dataset):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "d", n_train=60, n_dev=2, seed=1)
    data = tmp_path / "d" / "train.jsonl"
    for extra, used in (({"MAX_SAMPLES": "all"}, 60), ({"MAX_SAMPLES": 30}, 30)):
        caplog.clear()
        ft = FineTuner(_cfg(tiny_glm_dir, data, **extra))
        with caplog.at_level(logging.INFO):
            ft.setup().prepare_data()
        assert ft.records["used"] == used and ft.records["valid"] == 60
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "valid records" in r.message]
        assert not [w for w in ft.plan.warnings if "valid records" in w]
    assert any("using 30 of its 60 valid records (MAX_SAMPLES=30: set by you)" in r.message for r in caplog.records)
