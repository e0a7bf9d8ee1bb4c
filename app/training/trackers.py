"""REPORT_TO: where a run's metrics go besides metrics.jsonl. TensorBoard (the default) writes OUTPUT_DIR/runs;
W&B, MLflow, Trackio and SwanLab go through transformers' own callbacks for them, set up to work offline:

- wandb: offline (files under OUTPUT_DIR/wandb, `wandb sync` later) unless WANDB_API_KEY or WANDB_MODE is set;
- swanlab: offline mode unless SWANLAB_API_KEY or SWANLAB_MODE is set;
- mlflow: a local SQLite store, OUTPUT_DIR/mlflow.db (MLflow 3 refuses its old file store), unless
  MLFLOW_TRACKING_URI is set;
- trackio: its local store (it has no server unless you start one).

Each default is logged in one line that names the variable to change it. Their packages are optional
(requirements-trackers.txt): a missing one is one line before any work (the pre-flight). No torch here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# REPORT_TO name -> (module it imports, pip package); the names are app.config.fields.TRACKER_NAMES'
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
    "swanlab": ("swanlab", "swanlab"),
}


# What each tracker writes into OUTPUT_DIR under its default settings (the run's manifest lists them).
WRITES: dict[str, tuple[str, ...]] = {"tensorboard": ("runs",), "wandb": ("wandb",), "mlflow": ("mlflow.db",)}


def run_entries(report_to: list[str]) -> list[str]:
    """The names the chosen trackers write into OUTPUT_DIR."""
    return [name for t in chosen(report_to) for name in WRITES.get(t, ())]


def chosen(report_to: list[str]) -> list[str]:
    return [t for t in report_to if t in TRACKERS]


def missing(report_to: list[str]) -> list[str]:
    """One line per chosen tracker whose package is not installed (the pre-flight: before any work)."""
    return [
        f"REPORT_TO={name}: its package is not installed; pip install {TRACKERS[name][1]} (every tracker: "
        f"pip install -r requirements-trackers.txt), or leave {name} out of REPORT_TO"
        for name in chosen(report_to)
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None
    ]


def offline_defaults(report_to: list[str], out: Path, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set each chosen tracker's offline default in ``environ`` (os.environ) where the user set nothing; return
    one line per default set, for the log."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    said = []

    def default(var: str, value: str, why: str) -> None:
        if var not in env:
            env[var] = value
            said.append(f"REPORT_TO: {why}: {var}={value} (set {var} to change it)")

    names = chosen(report_to)
    if "wandb" in names and not env.get("WANDB_API_KEY"):
        default("WANDB_MODE", "offline", "W&B runs offline without WANDB_API_KEY (`wandb sync` uploads later)")
        default("WANDB_DIR", str(out.resolve()), "W&B writes its files in the run's dir")
    if "swanlab" in names and not env.get("SWANLAB_API_KEY"):
        default("SWANLAB_MODE", "offline", "SwanLab runs offline without SWANLAB_API_KEY")
    if "mlflow" in names:
        default(
            "MLFLOW_TRACKING_URI",
            f"sqlite:///{out.resolve() / 'mlflow.db'}",
            "MLflow logs to a local SQLite store in the run's dir",
        )
    return said


def callbacks(report_to: list[str], out: Path) -> list[Any]:
    """The Trainer callbacks for the chosen trackers but TensorBoard (the trainer adds its own, writing to
    OUTPUT_DIR/runs), after their offline defaults are set."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    for line in offline_defaults(report_to, out):
        log.info("%s", line)
    return [INTEGRATION_TO_CALLBACK[name]() for name in chosen(report_to) if name != "tensorboard"]
