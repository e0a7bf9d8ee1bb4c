"""Pre-flight: every problem that needs no model, found before torch is imported, reported together.

A user who gets one error, fixes it, waits for torch and a tokenizer to load, and then gets the
next one, loses minutes per mistake. So the cheap checks run first, in well under a second, and
all of their findings come back at once, one line each:
- the settings (Config.validate);
- the data files: present, a file, a known type, UTF-8, records of a known format, not too many
  bad ones (a file over QUICK_LOOK_MB is judged on its first QUICK_LOOK_RECORDS records here, and
  whole when training reads it);
- MODEL_NAME when it can only be a local path, or its weights are not there to load (a local dir's, or
  with the hub out of reach the HF cache's; info plans from the config alone and says so);
- for train: OUTPUT_DIR (not in use by another run, writable, no finished run replaced unasked) and
  RESUME (a checkpoint of the same settings, with steps left: app/training/resume.py);
- for predict-custom / predict-file: PROMPT / INPUT_FILE, the one setting each needs;
- for the prediction commands and evaluate: INPUT_FILE, EVAL_PATH, PREDICTIONS;
- for those and merge / export-onnx: the adapter (or model, or ONNX export) they will load
  and its base model: there, and no damaged file in them (app.models.artifacts finds them,
  app.models.integrity checks them; MODEL_NAME's dir for train and info too).
Standard library only (app.data.records, app.models.artifacts and .integrity, app.training.checkpoints,
.resume and .runlock import no torch).
"""

from __future__ import annotations

import glob
from pathlib import Path

from app.config import Config, ConfigError
from app.core import generated
from app.core.errors import UserError

QUICK_LOOK_MB = 32  # files up to this size are read whole (the DuIE set, 0.5 MB, takes ~10 ms)
QUICK_LOOK_RECORDS = 2000
PREDICT = ("predict", "predict-custom", "predict-file", "chat")  # the prediction commands, one per mode


def preflight(cfg: Config, command: str) -> None:
    """Raise one UserError holding every problem found for ``command``; return when there is none."""
    problems: list[str] = []
    try:
        cfg.validate()
    except ConfigError as e:
        problems += e.problems
    if command in ("train", "info"):
        problems += _data_problems(cfg, command)
        problems += _model_problems(cfg, command)
    if command == "train":
        problems += _train_problems(cfg)
    problems += _mode_problems(cfg, command)
    if command in PREDICT + ("evaluate",):
        problems += _inference_problems(cfg)
    if command in PREDICT + ("evaluate", "merge", "export-onnx", "export-gguf"):
        problems += _run_problems(cfg, command)
    if command == "export-gguf" or (
        command in PREDICT + ("evaluate", "serve") and cfg.predict.infer_backend == "llama.cpp"
    ):
        from app.inference.llamacpp import missing

        problems += [
            p for p in [missing("make export-gguf" if command == "export-gguf" else "INFER_BACKEND=llama.cpp")] if p
        ]
    if problems:
        raise UserError(_unique(problems))


def default_data_missing(cfg: Config) -> bool:
    """DATA_PATH left at its default and no file there: train writes the sample data first."""
    return (
        "DATA_PATH" not in cfg.explicit
        and cfg.data.data_path == Config().data.data_path
        and not Path(cfg.data.data_path).exists()
    )


def _data_problems(cfg: Config, command: str) -> list[str]:
    from app.data.record_sources import dataset_files
    from app.data.records import check_stage, read_examples

    d, problems = cfg.data, []
    for setting, path in (("DATA_PATH", d.data_path), ("VAL_PATH", d.val_path)):
        if not path or (setting == "DATA_PATH" and default_data_missing(cfg)):
            continue
        p = Path(path)
        if not p.exists() and not p.suffix:
            continue  # a hub dataset name: loading it needs the network, left to training
        if p.is_dir():  # a dataset directory: its shards are there and of one kind; `datasets` reads them
            try:
                dataset_files(p, setting)
            except UserError as e:
                problems += e.problems
            continue
        quick = p.is_file() and p.stat().st_size > QUICK_LOOK_MB * 2**20
        try:
            _, report = read_examples(
                path, d.data_format, d.max_bad_ratio, setting, limit=QUICK_LOOK_RECORDS if quick else None, warn=False
            )
            check_stage(report, cfg.train.stage, setting)  # SFT records under STAGE=dpo, or pairs under sft
        except UserError as e:
            problems += e.problems
    return problems


def _model_problems(cfg: Config, command: str) -> list[str]:
    """info plans from the config alone: weights not downloaded yet are its notice (app/cli/info.py), not a problem."""
    from app.models.integrity import model_problems

    return model_problems(cfg.model.model_name, weights=command != "info")


def _train_problems(cfg: Config) -> list[str]:
    from app.data.cache import CACHE_KIND
    from app.models.artifacts import output_problem
    from app.training import dist, resume, runlock, trackers
    from app.training.checkpoints import output_dir_problems

    # (our torchrun workers run under their launcher's lock: for them it is not someone else's)
    who = runlock.holder(cfg.train.output_dir) if dist.owns_run_lock(cfg) else None
    if who is not None:  # another run is writing there: whatever else is in OUTPUT_DIR may change under us
        problems = [runlock.busy_line("OUTPUT_DIR", cfg.train.output_dir, who, "training there too", alternative=True)]
    else:
        problems = output_dir_problems(cfg)
        try:
            resume.decide(cfg)  # RESUME names a checkpoint this run can continue (same settings, steps left)
        except UserError as e:
            problems += e.problems
    problems += trackers.missing(cfg.train.report_to)  # an optional package: before any work, not at step 1
    tokens = output_problem(cfg, Path(cfg.data.cache_dir) / "tokens", "CACHE_DIR", CACHE_KIND)
    problems += [tokens] if tokens else []  # checked whether or not this run builds a cache: a cheap look
    ds = cfg.distributed.ds_config
    if ds and not Path(ds).is_file():
        problems.append(f"DS_CONFIG={ds}: no such file; use configs/ds_zero2.json or configs/ds_zero3.json")
    return problems


def _mode_problems(cfg: Config, command: str) -> list[str]:
    """The setting a prediction command cannot do without (make strips `PROMPT=   ` to empty)."""
    prompt = cfg.predict.prompt
    if command == "predict-custom" and not prompt:
        return ["PROMPT is empty: use make predict-custom PROMPT='你的问题' (make predict answers the built-in prompt)"]
    if command == "predict-custom" and not prompt.strip():
        return [
            "PROMPT is blank (only spaces); give the question, e.g. make predict-custom "
            "PROMPT='《星河往事》是由林远执导的电视剧。' (make predict uses the built-in prompt)"
        ]
    if command == "predict-file" and not cfg.predict.input_file:
        return ["INPUT_FILE is empty: use make predict-file INPUT_FILE=data/dev.jsonl"]
    return []


def _inference_problems(cfg: Config) -> list[str]:
    p, e, problems = cfg.predict, cfg.evaluation, []
    for setting, path in (("INPUT_FILE", p.input_file), ("EVAL_PATH", e.eval_path), ("PREDICTIONS", e.predictions)):
        if path and not Path(path).is_file():
            what = "a directory" if Path(path).is_dir() else "no such file"
            problems.append(f"{setting}={path}: {what}; point {setting} at a file")
    if p.input_file and p.output_file:  # file mode replaces OUTPUT_FILE whole: never with the input itself
        inputs = {
            Path(x).resolve(): var
            for var, x in (
                ("INPUT_FILE", p.input_file),
                ("DATA_PATH", cfg.data.data_path),
                ("VAL_PATH", cfg.data.val_path),
                ("EVAL_PATH", e.eval_path),
            )
            if x
        }
        clash = inputs.get(Path(p.output_file).resolve())
        if clash:
            problems.append(
                f"OUTPUT_FILE={p.output_file} is your {clash}; predictions would replace it: choose "
                "another OUTPUT_FILE, or leave it empty for <INPUT_FILE stem>.pred.jsonl"
            )
            return problems
    if p.input_file:  # replaced only while it is this tool's own output, unchanged since
        taken = generated.replace_problem(generated.predictions_path(p.input_file, p.output_file), "OUTPUT_FILE")
        problems += [taken] if taken else []
    return problems


def _run_problems(cfg: Config, command: str) -> list[str]:
    """The dirs the command will load (adapter, merged or full model, ONNX export, and the base model):
    there, and no damaged file in them; one line per dir."""
    from app.models.artifacts import base_model_for, find_adapter, is_full_model
    from app.models.integrity import dir_problems, model_problems

    if command == "evaluate" and cfg.evaluation.predictions:
        return []  # scoring a predictions file loads no model
    named = cfg.predict.adapter_dir.strip()
    if named and named.lower() != "none" and not Path(named).is_dir():
        return [_missing_adapter_line(Path(named))]
    try:
        adapter = find_adapter(cfg)
    except UserError as e:
        return e.problems
    if adapter is None:
        return model_problems(cfg.model.model_name)
    found = dir_problems(adapter, f"ADAPTER_DIR={adapter}")
    if is_full_model(adapter):
        return found  # the model itself: no separate base
    try:
        name, _ = base_model_for(cfg, adapter)
    except UserError as e:  # its train_config.json / adapter_config.json is damaged: already in ``found``
        return found or e.problems
    named_in = "train_config.json" if (adapter / "train_config.json").is_file() else "adapter_config.json"
    where = "" if "MODEL_NAME" in cfg.explicit else f" (the base model named in {adapter / named_in})"
    return found + model_problems(name, f"MODEL_NAME={name}{where}")


def _missing_adapter_line(path: Path) -> str:
    # A merge or export killed between its two renames (no atomic exchange on this filesystem) leaves
    # the previous copy beside the target; the next merge/export into it puts it back (app.core.atomic).
    aside = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")) if path.name else []
    if aside:
        return (
            f"ADAPTER_DIR={path}: no such directory: a merge or export into it was killed while replacing "
            f"it, and the previous copy is {aside[0]}; run the same `make merge` / `make export-onnx` again "
            "(it puts the previous copy back first), or point ADAPTER_DIR elsewhere"
        )
    return (
        f"ADAPTER_DIR={path}: no such directory; train first (`make train`), point ADAPTER_DIR "
        "at a run's OUTPUT_DIR, or use ADAPTER_DIR=none for the base model"
    )


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
