"""`make info`: what this machine has, the tier, every resolved setting and why, the predicted peak
memory and the expected time per optimizer step and for the run (app/plan/timing.py).

It runs the training run's own planning steps (setup, then the data's lengths and the memory
fit) and stops before loading weights, so what it prints is what `make train` would use.
"""
from __future__ import annotations

import sys

from app.cli.preflight import default_data_missing, preflight
from app.config import Config
from app.core.errors import ModelUnavailable, UserError
from app.models.integrity import weights_missing
from app.plan.tiers import fit_memory, format_info
from app.plan.timing import expected_time
from app.training.train import FineTuner


def run_info(cfg: Config) -> None:
    """Detected resources, tier, every resolved setting and why, predicted peak memory and time.

    Offline with a hub model that is not downloaded yet, it still shows all of that except the
    model's shape and the estimate, with the download command, and succeeds: it is the first
    thing a user runs. With the config (and tokenizer) but not the weights, a local dir or the HF
    cache's copy, it plans everything from the config and then says which weights are missing and
    how to fetch them: "will it fit, how long will it take?" comes before a 12 GB download."""
    preflight(cfg, "info")
    ft, name = FineTuner(cfg), cfg.model.model_name
    try:
        ft.setup()
    except ModelUnavailable as e:
        sys.stdout.write(format_info(ft.resources, ft.plan, None, name) + "\n\n"  # cli-output
                         f"model: {name} is not downloaded here and the hub is out of reach, so its shape, "
                         "MAX_SEQ_LEN and the memory estimate are unknown until it is. Download it with:\n"
                         f"  {e.command}\nthen use MODEL_NAME={e.command.rsplit(' ', 1)[-1]}\n")
        return
    except UserError:
        if ft.plan is not None:  # show what was detected before the model problem
            sys.stdout.write(format_info(ft.resources, ft.plan, None, name) + "\n")  # cli-output
        raise
    samples = None
    if default_data_missing(cfg):  # nothing to measure yet: the tier's lengths, and say why
        from app.cli.workspace import SAMPLE_TRAIN

        samples = round(min(SAMPLE_TRAIN, ft.cfg.data.max_samples or SAMPLE_TRAIN) * (1 - ft.cfg.data.val_size))
        ft.plan = fit_memory(ft.plan, ft.resources, ft.shape, None).warn(
            f"DATA_PATH={cfg.data.data_path} does not exist yet: `make train` writes the synthetic sample data "
            "there first; MAX_SEQ_LEN above is the tier's, not your data's")
    else:
        ft.prepare_data(build_cache=False)  # info writes nothing: a missing token cache is estimated
        samples = ft.records.get("train")  # the file's count: without a token cache the rows are a preview's
    timing = expected_time(ft.cfg, ft.shape, ft.model_path, ft.train_rows, ft.plan.device == "cuda",
                           train_samples=samples)
    head, sep, warnings = format_info(ft.resources, ft.plan, ft.shape, name).partition("\nwarning: ")
    sys.stdout.write(f"{head}\n{timing.line()}{sep}{warnings}\n")  # cli-output: the time beside the memory
    missing = weights_missing(name)
    if missing:
        sys.stdout.write(f"\n{missing.notice()}\n")  # cli-output
