"""The time model at the tokens a short run's steps really had: `python -m bench.scale_retime RUN MODEL TOKENS`.

A 3-step run sees 3 samples, not the data's mean length, and a step's time is not proportional to its
tokens (a 4-bit layer dequantizes all its weights once per pass, whatever the tokens). So the bench
evaluates the same model (app/plan/train_timing.py) at both lengths, in a fresh process in the allocator setting
the run had, and scales the run's own prediction by the ratio: the probe's own run-to-run noise cancels.
Prints one JSON object: {"ratio": T(measured tokens) / T(predicted tokens), "seq_predicted", "seq_measured"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ratio(run: Path, model: Path, tokens_per_step: float, released: bool) -> dict:
    from app.config import Config
    from app.plan.estimator import model_shape
    from app.plan.resources import tune_allocator
    from app.plan.stages import stage_cost
    from app.plan.train_timing import predict_step_time

    if released:
        tune_allocator()
    saved = json.loads((run / "train_config.json").read_text(encoding="utf-8"))
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    cfg = Config.from_dict(saved)
    shape = model_shape(str(model), trust_remote_code=cfg.model.trust_remote_code)
    # a DPO pair is two sequences, each counted in the tokens seen (app/plan/stages.py)
    per_sample = cfg.train.batch_size * cfg.train.grad_accum * stage_cost(cfg).sequences
    seq_pred = summary["predicted_tokens_per_step"] / per_sample
    seq_meas = tokens_per_step / per_sample
    head_share = summary.get("predicted_head_share", 1.0)
    at = {
        seq: predict_step_time(cfg, shape, summary.get("predicted_steps", 1), seq, head_share).step_s
        for seq in (seq_pred, seq_meas)
    }
    return {"ratio": at[seq_meas] / at[seq_pred], "seq_predicted": seq_pred, "seq_measured": seq_meas}


if __name__ == "__main__":
    run_dir, model_dir, tokens, released = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:] == ["released"]
    sys.stdout.write(json.dumps(ratio(Path(run_dir), Path(model_dir), tokens, released)) + "\n")  # cli-output
