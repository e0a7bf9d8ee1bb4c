"""REPORT_TO (app/training/trackers.py): the trackers get the run's metrics, the tool's own included (tokens/s,
memory, the memory guard, F1 on generated answers), offline by default; a tracker whose package is missing is
one line before any work. MLflow is installed for the test into a throw-away dir (it is an optional extra);
W&B, Trackio and SwanLab are not installed here: they are tested through the run's callback list (a recorder in
W&B's place), their offline defaults and the missing-package line."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys

import pytest

PINS = ("mlflow-skinny", "sqlalchemy", "alembic")  # as requirements-trackers.txt pins them


@pytest.fixture(scope="session")
def mlflow_dir(tmp_path_factory):
    """mlflow-skinny and its SQLite store's packages, pip-installed into a temp dir (not the venv); a skip naming
    the package index where pip cannot reach one, a failure instead under REQUIRE_TRACKERS=1 (CI)."""
    from pathlib import Path

    reqs = Path(__file__).resolve().parents[2] / "requirements-trackers.txt"
    pins = [line for line in reqs.read_text().splitlines() if line.split("==")[0] in PINS]
    assert len(pins) == len(PINS), pins
    target = tmp_path_factory.mktemp("mlflow-site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), *pins],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode:
        why = f"pip could not install {', '.join(pins)} (no package index reachable?): {done.stderr[-300:]}"
        if os.environ.get("REQUIRE_TRACKERS", "0") not in ("", "0"):
            pytest.fail(f"REQUIRE_TRACKERS=1: {why}", pytrace=False)
        pytest.skip(why)
    return target


def test_report_to_mlflow_logs_every_metric_to_a_local_store(mlflow_dir, tiny_glm_dir, data_dir, tmp_path, child_env):
    """Offline: no MLFLOW_TRACKING_URI, so the run's own OUTPUT_DIR/mlflow.db; the packages come after the venv's
    on sys.path, so only what the venv lacks is taken from the throw-away dir."""
    child_env.pop("MLFLOW_TRACKING_URI", None)
    argv = [
        "train",
        f"MODEL_NAME={tiny_glm_dir}",
        f"DATA_PATH={data_dir / 'train.jsonl'}",
        "OUTPUT_DIR=out",
        "MAX_STEPS=4",
        "LOGGING_STEPS=1",
        "EVAL_STEPS=2",
        "MAX_SAMPLES=24",
        "QUANT_LEVEL=none",
        "EVAL_METRIC=f1",
        "EVAL_SAMPLES=2",
        "MAX_NEW_TOKENS=8",
        "REPORT_TO=mlflow,tensorboard",
    ]
    code = f"import sys; sys.path.append({str(mlflow_dir)!r}); from app.__main__ import main; sys.exit(main({argv!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = (tmp_path / "out" / "mlflow.db").resolve()
    assert (
        f"REPORT_TO: MLflow logs to a local SQLite store in the run's dir: MLFLOW_TRACKING_URI=sqlite:///{store} "
        "(set MLFLOW_TRACKING_URI to change it)" in done.stderr
    )
    with sqlite3.connect(store) as db:
        logged = dict(db.execute("select key, count(*) from metrics group by key").fetchall())
    assert logged["loss"] == 4 and logged["eval_loss"] == 2
    # the tool's own metrics, not only the Trainer's
    for key in ("tokens_per_s", "rss_mb", "peak_rss_mb", "memory_guard_peak_mb", "memory_guard_warned", "eval_f1"):
        assert logged.get(key), (key, sorted(logged))
    assert (tmp_path / "out" / "runs").is_dir()  # TensorBoard too


def test_a_tracker_whose_package_is_missing_is_one_line_before_any_work(cli, tmp_path):
    missing = [name for name in ("wandb", "swanlab", "trackio") if importlib.util.find_spec(name) is None]
    assert missing, "the venv has every optional tracker: nothing to test here"  # they are extras, not requirements
    for name in missing:
        package = name
        code, errors, _ = cli("train", "MODEL_NAME=tiny", f"REPORT_TO=tensorboard,{name}")
        assert code == 2 and errors == [
            f"REPORT_TO={name}: its package is not installed; pip install {package} (every tracker: pip install -r "
            f"requirements-trackers.txt), or leave {name} out of REPORT_TO"
        ]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_trackers_default_to_offline_unless_a_key_or_uri_is_set(tmp_path):
    from app.training.trackers import offline_defaults

    env: dict[str, str] = {}
    said = offline_defaults(["wandb", "mlflow", "swanlab", "trackio"], tmp_path, env)
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(tmp_path.resolve())
    assert (
        env["SWANLAB_MODE"] == "offline" and env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    assert len(said) == 4 and all("to change it" in line for line in said)
    env = {"WANDB_API_KEY": "k", "SWANLAB_API_KEY": "k", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert offline_defaults(["wandb", "mlflow", "swanlab"], tmp_path, env) == []
    assert env == {"WANDB_API_KEY": "k", "SWANLAB_API_KEY": "k", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}


@pytest.mark.parametrize(
    "value, line",
    [
        (
            "tensorbord",
            "REPORT_TO=tensorbord: 'tensorbord' is not one of tensorboard, wandb, mlflow, trackio, swanlab, none",
        ),
        ("none,tensorboard", "REPORT_TO=none,tensorboard: none means no tracker; give it alone"),
    ],
)
def test_a_bad_report_to_is_one_line(cli, value, line):
    code, errors, _ = cli("train", "MODEL_NAME=tiny", f"REPORT_TO={value}")
    assert code == 2 and errors == [line]


def test_report_to_none_writes_no_tensorboard_logs(tiny_glm_dir, data_dir, tmp_path, recipe, monkeypatch):
    from app.training.train import FineTuner

    monkeypatch.chdir(tmp_path)
    FineTuner(recipe(tiny_glm_dir, data_dir, tmp_path / "none", MAX_STEPS=2, REPORT_TO="none")).run()
    FineTuner(recipe(tiny_glm_dir, data_dir, tmp_path / "default", MAX_STEPS=2)).run()
    assert not (tmp_path / "none" / "runs").exists() and (tmp_path / "default" / "runs").is_dir()


def test_every_tracker_callback_gets_the_tools_metrics(tiny_glm_dir, data_dir, tmp_path, recipe, monkeypatch):
    """W&B, Trackio and SwanLab are not installed here: a recorder stands in for W&B's callback in transformers'
    table, and the run's callback list must hand it the Trainer's metrics and the tool's (tokens/s, memory, the
    guard, eval F1), with W&B's offline default set and said."""
    import transformers.integrations
    from transformers import TrainerCallback

    from app.training.train import FineTuner

    seen: list[dict] = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs or {}))

    monkeypatch.setitem(transformers.integrations.INTEGRATION_TO_CALLBACK, "wandb", Recorder)
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    FineTuner(
        recipe(
            tiny_glm_dir,
            data_dir,
            tmp_path / "out",
            MAX_STEPS=4,
            REPORT_TO="wandb",
            EVAL_METRIC="f1",
            EVAL_STEPS=2,
            EVAL_SAMPLES=2,
            MAX_NEW_TOKENS=8,
        )
    ).run()
    keys = set().union(*seen)
    for key in ("loss", "eval_loss", "tokens_per_s", "rss_mb", "memory_guard_peak_mb", "eval_f1"):
        assert key in keys, (key, sorted(keys))
    assert os.environ["WANDB_MODE"] == "offline"
    assert not (tmp_path / "out" / "runs").exists()  # REPORT_TO=wandb alone: no TensorBoard


def test_each_report_to_name_has_its_package():
    from app.config.fields import TRACKER_NAMES
    from app.training.trackers import TRACKERS

    assert set(TRACKERS) == set(TRACKER_NAMES) - {"none"}
