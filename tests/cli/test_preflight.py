"""Nothing silent, nothing late (issue 14, items 4, 6, 7 and 10): a misspelt variable is an error
however it was given; every problem that needs no model is reported together before torch is
imported; the quick start and a real run get their own OUTPUT_DIR; `info` works offline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import TIERED, Config, ConfigError, default_output_dir, make_overrides

REPO = Path(__file__).resolve().parents[2]


def _errors(proc):
    return [line.split(" ERROR app: ", 1)[1] for line in proc.stderr.splitlines() if " ERROR app: " in line]


# ---- item 4: a misspelt name is an error, however it was given ------------------------------------------


def test_make_command_line_names_are_checked():
    assert make_overrides({"MAKEFLAGS": r"s -- PROMPT=a\ b=c\ 中文 MAX_SAMPLE=10"}) == ["PROMPT", "MAX_SAMPLE"]
    assert make_overrides({"MAKEFLAGS": " -j2 --jobserver-auth=3,4 -- X:=1"}) == ["X"]
    assert make_overrides({"MAKEFLAGS": ""}) == [] and make_overrides({}) == []
    with pytest.raises(ConfigError) as err:
        Config.load(
            env={
                # REQUIRE_GPU: `make test-gpu REQUIRE_GPU=1` (scripts/gpu-check.sh) reaches the app's own runs
                "MAKEFLAGS": " -- MAX_SAMPLE=10 RUNTIME=local HF_TOKEN=x OMP_NUM_THREADS=2 TORCH_COMPIL=1"
                " REQUIRE_GPU=1",
                "MAX_SAMPLE": "10",
            },
            dotenv_path=None,
        )
    assert err.value.problems == [
        "MAX_SAMPLE (on the make command line): unknown setting; did you mean MAX_SAMPLES?",
        "TORCH_COMPIL (on the make command line): unknown setting; did you mean TORCH_COMPILE?",
    ]


def test_unknown_keys_in_dotenv_are_errors_but_compose_and_library_names_are_not(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "MAX_SAMPLE=10\nLORA_R=4\nUID=1000\nMEM_LIMIT=6g\nHF_ENDPOINT=https://hf-mirror.com\n"
        "CUDA_VISIBLE_DEVICES=0\nBATCHSIZE=2\n"
    )
    with pytest.raises(ConfigError) as err:
        Config.load(env={}, dotenv_path=dotenv)
    assert len(err.value.problems) == 2, err.value.problems
    assert f"MAX_SAMPLE (in {dotenv}): unknown setting; did you mean MAX_SAMPLES?" in err.value.problems
    assert any(p.startswith("BATCHSIZE") and "BATCH_SIZE" in p for p in err.value.problems)
    dotenv.write_text("LORA_R=4\nUID=1000\nHF_ENDPOINT=x\n")
    assert Config.load(env={}, dotenv_path=dotenv).lora.lora_r == 4


def test_make_train_with_a_misspelt_variable_fails_before_anything_runs(tmp_path, child_env):
    """The issue's reproduction, through make itself: MAX_SAMPLE=10 used to train on every record."""
    proc = subprocess.run(
        [
            "make",
            "-o",
            ".venv/.installed",
            "-C",
            str(REPO),
            "train",
            "MAX_SAMPLE=10",
            "RUNTIME=local",
            f"OUTPUT_DIR={tmp_path}/out",
            "DATA_PATH=/nonexistent/x.jsonl",
        ],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "MAX_SAMPLE (on the make command line): unknown setting; did you mean MAX_SAMPLES?" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- item 6: every cheap problem at once, before torch ----------------------------------------------------


@pytest.fixture
def no_torch(tmp_path):
    """A PYTHONPATH entry whose `torch` stops the process: a command that imports it before its
    pre-flight is over prints that instead of the problems."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    return str(tmp_path / "stub")


def _finished_run(out: Path) -> None:
    """A finished run's files, in a folder marked as this tool's run, as training marks it."""
    from app.core import ownership

    ownership.claim(out, "train")
    ownership.register(out, ["adapter_model.safetensors", "summary.json"])
    (out / "adapter_model.safetensors").write_bytes(b"x")
    (out / "summary.json").write_text(json.dumps({"steps": 7}))


def test_train_reports_every_cheap_problem_together_without_importing_torch(tmp_path, no_torch, run_app):
    _finished_run(tmp_path / "out")
    proc = run_app(
        [
            "train",
            "DATA_PATH=nope.jsonl",
            "OUTPUT_DIR=out",
            "MODEL_NAME=./no-model",
            "BATCH_SIZE=0",
            "VAL_PATH=val.csv",
        ],
        timeout=120,
        PYTHONPATH=f"{no_torch}{os.pathsep}{REPO}",
    )
    assert proc.returncode == 2, proc.stderr
    assert "torch was imported" not in proc.stderr and "Traceback" not in proc.stderr
    errors = _errors(proc)
    assert [e.split(":")[0].split(" ")[0].split("=")[0] for e in errors] == [
        "BATCH_SIZE",
        "DATA_PATH",
        "VAL_PATH",
        "MODEL_NAME",
        "OUTPUT_DIR",
    ], errors
    assert "DATA_PATH=nope.jsonl: no such file" in errors[1] and "already holds a finished run" in errors[4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stub"]  # nothing written


def test_bad_records_are_found_before_torch_too(tmp_path, no_torch, run_app):
    (tmp_path / "bad.jsonl").write_text('not json\n{"context": "q"}\n{"context": "q", "target": "a"}\n')
    proc = run_app(
        ["train", "DATA_PATH=bad.jsonl", "MODEL_NAME=tiny"], timeout=120, PYTHONPATH=f"{no_torch}{os.pathsep}{REPO}"
    )
    assert proc.returncode == 2 and "torch was imported" not in proc.stderr, proc.stderr
    assert _errors(proc) == [
        "DATA_PATH=bad.jsonl: 2 of 3 records are bad, more than MAX_BAD_RATIO=0.2 "
        "(line 1: bad JSON; line 2: missing field 'target'); fix those lines or raise "
        "MAX_BAD_RATIO"
    ]


def test_large_files_get_a_quick_look_only(tmp_path, monkeypatch):
    """Over QUICK_LOOK_MB only the first records are read before training (the bad ratio is a
    property of the whole file, judged when training reads it): a bad first record still shows."""
    import app.cli.preflight as pf

    monkeypatch.setattr(pf, "QUICK_LOOK_MB", 0)
    monkeypatch.setattr(pf, "QUICK_LOOK_RECORDS", 2)
    path = tmp_path / "big.jsonl"
    path.write_text('{"context": "q", "target": "a"}\n' * 2 + "bad\n" * 5)  # 5 of 7 bad: past the first two
    cfg = Config.load(overrides={"DATA_PATH": str(path), "MODEL_NAME": "tiny"}, env={}, dotenv_path=None)
    assert pf._data_problems(cfg, "train") == []
    path.write_text('{"prompt": "q"}\n' + '{"context": "q", "target": "a"}\n' * 5)
    assert "cannot tell the record format" in pf._data_problems(cfg, "train")[0]


# ---- item 7: the quick start and the real run do not collide ---------------------------------------------


def test_default_output_dir_is_per_model_and_method():
    tiny = Config.load(overrides={"MODEL_NAME": "tiny"}, env={}, dotenv_path=None)
    real = Config.load(env={}, dotenv_path=None)
    assert tiny.train.output_dir == "models/tiny-lora"
    assert real.train.output_dir == "models/glm-edge-1.5b-chat-lora"
    assert (
        Config.load(overrides={"MODEL_NAME": "tiny", "METHOD": "full"}, env={}, dotenv_path=None).train.output_dir
        == "models/tiny-full"
    )
    assert default_output_dir("/home/me/my models/Qwen2.5-0.5B/", "qlora") == "models/Qwen2.5-0.5B-qlora"
    dpo = Config.load(
        overrides={"MODEL_NAME": "tiny", "STAGE": "dpo", "DATA_PATH": "data/pref.jsonl"}, env={}, dotenv_path=None
    )
    assert dpo.train.output_dir == "models/tiny-lora-dpo-pref"  # never the SFT run it may continue
    given = Config.load(overrides={"MODEL_NAME": "tiny", "OUTPUT_DIR": "runs/a"}, env={}, dotenv_path=None)
    assert given.train.output_dir == "runs/a" and "OUTPUT_DIR" in given.explicit
    assert "OUTPUT_DIR" not in tiny.explicit  # derived, not the user's


def test_quick_start_run_does_not_block_the_real_run(tmp_path, no_torch, child_env):
    """After the README's tiny run, the next (real) `make train` is not refused as a finished run."""
    _finished_run(tmp_path / "models" / "tiny-lora")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"context": "q", "target": "a"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.config import Config; from app.cli.preflight import "
            "preflight; preflight(Config.load(), 'train'); print('ok')",
        ],
        cwd=tmp_path,
        env={**child_env, "PYTHONPATH": f"{no_torch}{os.pathsep}{REPO}"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---- item 5 (help) and item 10: info offline ---------------------------------------------------------------


def test_help_says_the_tier_decides_the_tiered_defaults():
    from app.plan.explain import tier_settings

    assert set(TIERED) == set(tier_settings())
    text = Config.help_text()
    for var in TIERED:
        line = next(x for x in text.splitlines() if x.strip().startswith(var + " "))
        assert "TIER=auto decides it" in line, line


def test_info_offline_shows_everything_but_the_shape_and_the_download_command(tmp_path, run_app):
    proc = run_app(["info", "MODEL_NAME=nobody/not-downloaded-model", "MEMORY_LIMIT_MB=8192"], HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RAM total" in out and re.search(r"tier +cpu-s", out) and "MAX_SAMPLES" in out
    assert "hf download nobody/not-downloaded-model --local-dir models/not-downloaded-model" in out
    assert "shape" in out and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # info writes nothing, not even the sample data


def test_offline_training_error_gives_the_download_command(run_app):
    proc = run_app(["train", "MODEL_NAME=nobody/not-downloaded-model"], HF_HUB_OFFLINE="1")
    assert proc.returncode == 2
    (line,) = _errors(proc)
    assert "MODEL_NAME=nobody/not-downloaded-model: not found locally" in line
    assert "`.venv/bin/hf download nobody/not-downloaded-model --local-dir models/not-downloaded-model`" in line
    assert "huggingface-cli" not in (REPO / "README.md").read_text(encoding="utf-8")


def test_predict_file_never_writes_its_output_over_an_input(tmp_path, run_app):
    (tmp_path / "x.jsonl").write_text('{"context": "q", "target": "a"}\n')
    before = (tmp_path / "x.jsonl").read_bytes()
    proc = run_app(["predict", "INPUT_FILE=x.jsonl", "OUTPUT_FILE=./x.jsonl", "ADAPTER_DIR=none", "MODEL_NAME=tiny"])
    assert proc.returncode == 2
    assert _errors(proc) == [
        "OUTPUT_FILE=./x.jsonl is your INPUT_FILE; predictions would replace it: choose another "
        "OUTPUT_FILE, or leave it empty for <INPUT_FILE stem>.pred.jsonl"
    ]
    assert (tmp_path / "x.jsonl").read_bytes() == before


# ---- issue 28: info plans before the download; train still refuses ----------------------------------------


def _config_and_tokenizer(model: Path, dest: Path) -> str:
    """A model as it is before its weights are fetched: ``model``'s files but the weights."""
    dest.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (dest / f.name).write_bytes(f.read_bytes())
    return str(dest)


@pytest.mark.parametrize("where", ["local-dir", "hf-cache"])
def test_info_plans_from_the_config_alone_and_train_refuses_without_weights(
    tmp_path, tiny_glm_dir, make_data, no_torch, run_app, where
):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    if where == "local-dir":
        name = _config_and_tokenizer(tiny_glm_dir, tmp_path / "glm-6b")
        fetch = f".venv/bin/hf download <owner>/glm-6b --local-dir {name}"
    else:  # a hub name whose config and tokenizer are in the HF cache, its weights not, and no hub
        name, fetch = "someorg/glm-6b", ".venv/bin/hf download someorg/glm-6b --local-dir models/glm-6b"
        repo = tmp_path / "hf" / "hub" / "models--someorg--glm-6b"
        _config_and_tokenizer(tiny_glm_dir, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    args = [
        f"MODEL_NAME={name}",
        f"DATA_PATH={make_data(n_train=40, n_dev=5) / 'train.jsonl'}",
        "OUTPUT_DIR=out",
        "MEMORY_LIMIT_MB=8192",
    ]
    info = run_app(["info", *args], **env)
    assert info.returncode == 0, info.stderr[-2000:]
    out = info.stdout
    assert re.search(r"model +\S+: 0\.3M params, 2 layers, hidden 64", out) and re.search(r"tier +cpu-s", out), out
    assert "predicted peak RSS:" in out and re.search(r"^expected (~.+ per optimizer step|time: unknown)", out, re.M)
    assert "weights: not here yet: model.safetensors is missing (no weights at all)" in out
    assert "`make train` needs the weights. Fetch them" in out and f"\n  {fetch}\n" in out, out
    train = run_app(["train", *args], timeout=120, PYTHONPATH=f"{no_torch}{os.pathsep}{REPO}", **env)
    assert train.returncode == 2 and "torch was imported" not in train.stderr, train.stderr
    (line,) = _errors(train)  # one line, before anything loads
    assert line.startswith(f"MODEL_NAME={name}: ") and "model.safetensors is missing (no weights at all)" in line
    assert f"`{fetch}`" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "settings, output_file, clash",
    [
        ({"INPUT_FILE": "x.jsonl"}, "{cwd}/x.jsonl", "INPUT_FILE"),  # absolute
        ({"INPUT_FILE": "x.jsonl"}, "sub/../x.jsonl", "INPUT_FILE"),  # through ..
        ({"INPUT_FILE": "{cwd}/x.jsonl"}, "x.jsonl", "INPUT_FILE"),
        ({"INPUT_FILE": "in.jsonl", "DATA_PATH": "data/train.jsonl"}, "{cwd}/data/train.jsonl", "DATA_PATH"),
        ({"INPUT_FILE": "in.jsonl", "VAL_PATH": "data/val.jsonl"}, "data/sub/../val.jsonl", "VAL_PATH"),
        ({"INPUT_FILE": "in.jsonl", "EVAL_PATH": "data/dev.jsonl"}, "sub/../data/dev.jsonl", "EVAL_PATH"),
    ],
    ids=["absolute", "dotdot", "absolute-input", "data-path", "val-path", "eval-path"],
)
def test_predict_file_knows_an_input_under_any_spelling(tmp_path, monkeypatch, settings, output_file, clash):
    """The same file as INPUT_FILE, DATA_PATH, VAL_PATH or EVAL_PATH, spelt another way (absolute, with ..):
    still the input, which file mode would replace whole."""
    from app.cli.preflight import preflight
    from app.core.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "data" / "sub").mkdir(parents=True)
    for name in ("x.jsonl", "in.jsonl", "data/train.jsonl", "data/val.jsonl", "data/dev.jsonl"):
        (tmp_path / name).write_text('{"context": "q", "target": "a"}\n')
    values = {k: v.format(cwd=tmp_path) for k, v in settings.items()}
    output_file = output_file.format(cwd=tmp_path)
    cfg = Config.load(
        overrides={**values, "OUTPUT_FILE": output_file, "ADAPTER_DIR": "none", "MODEL_NAME": "tiny"},
        env={},
        dotenv_path=None,
    )
    with pytest.raises(UserError) as e:
        preflight(cfg, "predict")
    assert e.value.problems == [
        f"OUTPUT_FILE={output_file} is your {clash}; predictions would replace it: choose "
        "another OUTPUT_FILE, or leave it empty for <INPUT_FILE stem>.pred.jsonl"
    ]
    preflight(
        Config.load(
            overrides={**values, "OUTPUT_FILE": "out.jsonl", "ADAPTER_DIR": "none", "MODEL_NAME": "tiny"},
            env={},
            dotenv_path=None,
        ),
        "predict",
    )  # another file: fine
