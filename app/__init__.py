"""ChatGLM-CPU-Trainer: LoRA fine-tuning of chat LLMs on an ordinary PC.

Importable from a notebook::

    from app import Config, FineTuner
    cfg = Config.from_dict({"MODEL_NAME": "tiny", "MAX_SAMPLES": 50, "NUM_EPOCHS": 1})
    ft = FineTuner(cfg); ft.setup(); ft.prepare_data(); ft.train()

Heavy modules (torch, transformers) load only when FineTuner / Predictor are touched, so
``python -m app --help`` is instant and works before the virtualenv has them.
"""

from __future__ import annotations

from typing import Any

from app.config import Config, ConfigError
from app.core.errors import UserError

__all__ = ["Config", "ConfigError", "UserError", "FineTuner", "Predictor"]


def __getattr__(name: str) -> Any:
    if name == "FineTuner":
        from app.training.train import FineTuner

        return FineTuner
    if name == "Predictor":
        from app.inference.predict import Predictor

        return Predictor
    raise AttributeError(name)
