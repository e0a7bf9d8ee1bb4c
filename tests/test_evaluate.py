"""Evaluation end to end: reports from a trained tiny adapter, score-only mode, F1 during
training, and METHOD=full (which the demo uses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import Config, FineTuner, UserError
from app.evaluate import run_evaluate
from app.predict import Predictor
from test_train import chdir, data_dir  # noqa: F401  (shared fixture)

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"triplet_precision", "triplet_recall", "triplet_f1", "triplet_f1_typed", "classification_accuracy",
               "json_valid_rate", "n_samples"}


def quick(model_dir, data_dir, out, **extra):
    return Config.from_dict({"MODEL_NAME": str(model_dir), "DATA_PATH": str(data_dir / "train.jsonl"),
                             "VAL_PATH": str(data_dir / "dev.jsonl"), "OUTPUT_DIR": str(out), "MAX_STEPS": 2,
                             "GRAD_ACCUM": 1, "BATCH_SIZE": 2, "TIER": "none", "SEED": 0, "EVAL_STEPS": 1,
                             "MAX_SAMPLES": 20, **extra})


def test_evaluate_writes_every_report(tiny_glm_dir, data_dir, tmp_path):
    with chdir(tmp_path):
        out = FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out")).run().output_dir
        metrics = run_evaluate(Config.from_dict({"ADAPTER_DIR": str(out), "EVAL_PATH": str(data_dir / "dev.jsonl"),
                                                 "EVAL_SAMPLES": 6}))
    files = {p.name for p in (out / "eval").iterdir()}
    assert files == {"report.json", "report.md", "predictions.jsonl", "per_predicate_f1.png"}
    report = json.loads((out / "eval" / "report.json").read_text())
    assert REPORT_KEYS <= report.keys() and report["n_samples"] == 6 == metrics["n_samples"]
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all({"gold", "output", "correct", "missing", "spurious"} <= r.keys() for r in rows)
    # a random tiny model finds nothing: every gold triplet is missing
    assert report["triplet_recall"] == 0.0 and sum(len(r["missing"]) for r in rows) > 0


def test_score_only_mode_from_the_command_line(tmp_path):
    gold = '```json\n[{"predicate": "导演", "object_type": "人物", "subject_type": "影视作品", "object": "林远", "subject": "星河"}]\n```'
    lines = [{"target": gold, "output": gold}, {"reference": gold, "output": "我不知道"}, {"target": '["平板"]', "output": '["平板"]'}]
    src = tmp_path / "preds.jsonl"
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in Config.variables()}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "app", "evaluate", "--predictions", str(src)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "preds.eval" / "report.json").read_text())
    assert report["triplet_precision"] == 1.0 and report["triplet_recall"] == 0.5
    assert report["classification_accuracy"] == 1.0 and report["n_samples"] == 3
    src.write_text('{"target": "x"}\nnot json\n')
    bad = subprocess.run([sys.executable, "-m", "app", "evaluate", "--predictions", str(src)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in bad.stderr.splitlines() if " ERROR " in line]
    assert bad.returncode == 2 and len(errors) == 1 and "line 1" in errors[0] and "output" in errors[0]


def test_f1_during_training_is_logged_and_picks_the_best(tiny_glm_dir, data_dir, tmp_path):
    with chdir(tmp_path):
        FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out", EVAL_METRIC="f1", EVAL_SAMPLES=3)).run()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    f1_steps = [r["step"] for r in rows if "eval_f1" in r]
    assert f1_steps == [1, 2] and all(0.0 <= r["eval_f1"] <= 1.0 for r in rows if "eval_f1" in r)
    assert (tmp_path / "out" / "best" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_saves_a_standalone_model_that_predict_loads(tiny_glm_dir, data_dir, tmp_path):
    with chdir(tmp_path):
        ft = FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out", METHOD="full", LEARNING_RATE=1e-3))
        ft.run()
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert all(p.requires_grad for p in ft.model.parameters())
    pred = Predictor(Config.from_dict({"ADAPTER_DIR": str(out), "MAX_NEW_TOKENS": 4}))
    ids = torch.tensor([ft.train_rows[0]["input_ids"]])
    ft.model.eval()
    with torch.no_grad():
        assert torch.allclose(pred.model(input_ids=ids).logits, ft.model(input_ids=ids).logits, atol=1e-5)


def test_full_with_quantization_is_rejected():
    with pytest.raises(UserError, match="METHOD=full"):
        Config.from_dict({"METHOD": "full", "QUANT_LEVEL": "4bit"}).validate()


def test_merge_writes_a_model_that_loads_without_peft(tiny_glm_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from app.merge import run_merge

    with chdir(tmp_path):
        # fp32: ft.model is compared with the fp32 merged model (under bf16 its frozen weights are bf16)
        ft = FineTuner(quick(tiny_glm_dir, data_dir, tmp_path / "out", QUANT_LEVEL="none", LEARNING_RATE=1e-2,
                             PRECISION="fp32"))
        ft.run()
        merged_dir = run_merge(Config.from_dict({"ADAPTER_DIR": str(tmp_path / "out")}))
    assert merged_dir == tmp_path / "out" / "merged" and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert "peft" not in type(merged).__module__
    ids = torch.tensor([ft.train_rows[0]["input_ids"]])
    ft.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ft.model(input_ids=ids).logits, atol=1e-4)
