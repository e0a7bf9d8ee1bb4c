"""The command line as a user meets it: bad input gives one clear line and a non-zero exit,
leaves no output dir behind, and the offline tiny path trains and predicts end to end."""

import json
import os

import pytest


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if " ERROR " in line]


def test_bad_settings_exit_2_with_every_problem_named(tmp_path, run_app):
    proc = run_app(["train", "BATCH_SIZE=0", "LORA_R=-1", "NUM_EPOCHS=abc"], tmp_path)
    assert proc.returncode == 2
    errors = error_lines(proc)
    assert len(errors) == 3, proc.stderr
    assert any("BATCH_SIZE=0" in e for e in errors) and any("LORA_R=-1" in e for e in errors)
    assert any("NUM_EPOCHS='abc'" in e for e in errors)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content, setting",
    [
        (None, "DATA_PATH=missing.jsonl"),
        ('not json\n{"context": "q"}\n{"context": "q", "target": ""}\n', "no valid records"),
    ],
)
def test_bad_data_fails_before_anything_is_written(tmp_path, tiny_glm_dir, content, setting, run_app):
    if content is not None:
        (tmp_path / "missing.jsonl").write_text(content)
    proc = run_app(["train", f"MODEL_NAME={tiny_glm_dir}", "DATA_PATH=missing.jsonl", "OUTPUT_DIR=out"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = error_lines(proc)
    assert len(errors) == 1 and setting in errors[0] and "DATA_PATH" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_names_model_name_and_the_fix(tmp_path, run_app):
    proc = run_app(["train", "MODEL_NAME=nobody/no-such-model-xyz"], tmp_path)
    assert proc.returncode == 2
    errors = error_lines(proc)
    assert len(errors) == 1 and "MODEL_NAME=nobody/no-such-model-xyz" in errors[0] and "MODEL_NAME=tiny" in errors[0]


def test_unknown_command_and_help(tmp_path, run_app):
    assert run_app(["trian"], tmp_path).returncode == 2
    helped = run_app(["--help"], tmp_path)
    assert helped.returncode == 0 and "MAX_SEQ_LEN" in helped.stdout and "predict-custom" in helped.stdout
    one = run_app(["train", "--help"], tmp_path)  # a real process: no torch, no logging, no settings check
    assert one.returncode == 0 and one.stdout.startswith("usage: python -m app train") and not one.stderr


def test_offline_tiny_train_then_predict_end_to_end(tmp_path, run_app):
    """What the README's first command does, minus make: generate data, train tiny, predict."""
    assert run_app(["generate-data"], tmp_path).returncode == 0
    assert (tmp_path / "data" / "train.jsonl").is_file()
    train = run_app(["train", "MODEL_NAME=tiny", "MAX_SAMPLES=20", "NUM_EPOCHS=1", "GRAD_ACCUM=2"], tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "models" / "tiny-lora"  # OUTPUT_DIR's default: one dir per model and method
    assert (out / "adapter_model.safetensors").is_file() and (tmp_path / "models" / "tiny-glm").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    # 18 train samples; the tier picks the micro-batch (machine-dependent), GRAD_ACCUM=2 is ours
    assert summary["plan"]["GRAD_ACCUM"] == 2 and summary["plan"]["MAX_SAMPLES"] == 20
    assert summary["steps"] == -(-18 // (summary["plan"]["BATCH_SIZE"] * 2))
    assert "tok_s=" in train.stderr  # the progress bar shows throughput
    pred = run_app(["predict-custom", "PROMPT=你好，抽取三元组", "MAX_NEW_TOKENS=5"], tmp_path)
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert "prompt: 你好，抽取三元组" in pred.stdout
    assert "adapter models/tiny-lora" in pred.stderr  # from models/.last_run, relative to the working dir


def test_info_sees_the_memory_limit_and_picks_the_tier(tmp_path, memory_cgroup, run_app):
    """`make info` inside a 6 GB limit (a real cgroup, as `docker run --memory 6g` makes, where we
    can create one) reports 6 GB, not the host's RAM, and the 6-12 GB tier."""
    cgroup = memory_cgroup(6144)
    args = ["info", "MODEL_NAME=tiny"] + ([] if cgroup else ["MEMORY_LIMIT_MB=6144"])
    assert run_app(["generate-data"], tmp_path).returncode == 0

    def enter():
        if cgroup:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = run_app(args, tmp_path, timeout=300, preexec_fn=enter)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "RAM total      6.0 GB (" + ("cgroup v" if cgroup else "MEMORY_LIMIT_MB") in out, out
    assert "tier           cpu-s" in out
    assert "QUANT_LEVEL            = 4bit" in out and "MAX_SEQ_LEN" in out and "% of the" in out
    assert "predicted peak RSS:" in out
