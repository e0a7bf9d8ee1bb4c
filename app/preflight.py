"""Pre-flight: every problem that needs no model, found before torch is imported, reported together.

A user who gets one error, fixes it, waits for torch and a tokenizer to load, and then gets the
next one, loses minutes per mistake. So the cheap checks run first, in well under a second, and
all of their findings come back at once, one line each:
- the settings (Config.validate);
- the data files: present, a file, a known type, UTF-8, records of a known format, not too many
  bad ones (a file over QUICK_LOOK_MB is judged on its first QUICK_LOOK_RECORDS records here, and
  whole when training reads it);
- MODEL_NAME when it can only be a local path;
- for train: OUTPUT_DIR (writable, no finished run replaced unasked) and RESUME;
- for predict / evaluate: INPUT_FILE, EVAL_PATH, PREDICTIONS and a named ADAPTER_DIR.
Standard library only (app.data, app.checkpoints and app.modeling's path check import no torch).
"""
from __future__ import annotations

from pathlib import Path

from app.config import Config, ConfigError
from app.errors import UserError

QUICK_LOOK_MB = 32  # files up to this size are read whole (the DuIE set, 0.5 MB, takes ~10 ms)
QUICK_LOOK_RECORDS = 2000


def preflight(cfg: Config, command: str) -> None:
    """Raise one UserError holding every problem found for ``command``; return when there is none."""
    problems: list[str] = []
    try:
        cfg.validate()
    except ConfigError as e:
        problems += e.problems
    if command in ("train", "info"):
        problems += _data_problems(cfg, command)
        problems += _model_problems(cfg)
    if command == "train":
        problems += _train_problems(cfg)
    if command in ("predict", "evaluate"):
        problems += _inference_problems(cfg)
    if problems:
        raise UserError(_unique(problems))


def default_data_missing(cfg: Config) -> bool:
    """DATA_PATH left at its default and no file there: train writes the sample data first."""
    return ("DATA_PATH" not in cfg.explicit and cfg.data.data_path == Config().data.data_path
            and not Path(cfg.data.data_path).exists())


def _data_problems(cfg: Config, command: str) -> list[str]:
    from app.data import read_examples

    d, problems = cfg.data, []
    for setting, path in (("DATA_PATH", d.data_path), ("VAL_PATH", d.val_path)):
        if not path or (setting == "DATA_PATH" and default_data_missing(cfg)):
            continue
        p = Path(path)
        if not p.exists() and not p.suffix:
            continue  # a hub dataset name: loading it needs the network, left to training
        quick = p.is_file() and p.stat().st_size > QUICK_LOOK_MB * 2**20
        try:
            read_examples(path, d.data_format, d.max_bad_ratio, setting,
                          limit=QUICK_LOOK_RECORDS if quick else None, warn=False)
        except UserError as e:
            problems += e.problems
    return problems


def _model_problems(cfg: Config) -> list[str]:
    from app.modeling import local_model_problem

    problem = local_model_problem(cfg.model.model_name)
    return [problem] if problem else []


def _train_problems(cfg: Config) -> list[str]:
    from app.checkpoints import output_dir_problems, resume_checkpoint

    problems = output_dir_problems(cfg)
    try:
        resume_checkpoint(cfg)
    except UserError as e:
        problems += e.problems
    ds = cfg.distributed.ds_config
    if ds and not Path(ds).is_file():
        problems.append(f"DS_CONFIG={ds}: no such file; use configs/ds_zero2.json or configs/ds_zero3.json")
    return problems


def _inference_problems(cfg: Config) -> list[str]:
    p, e, problems = cfg.predict, cfg.evaluation, []
    for setting, path in (("INPUT_FILE", p.input_file), ("EVAL_PATH", e.eval_path), ("PREDICTIONS", e.predictions)):
        if path and not Path(path).is_file():
            what = "a directory" if Path(path).is_dir() else "no such file"
            problems.append(f"{setting}={path}: {what}; point {setting} at a file")
    if p.input_file and p.output_file:  # file mode replaces OUTPUT_FILE whole: never with the input itself
        inputs = {Path(x).resolve(): var for var, x in (("INPUT_FILE", p.input_file), ("DATA_PATH", cfg.data.data_path),
                                                        ("VAL_PATH", cfg.data.val_path), ("EVAL_PATH", e.eval_path)) if x}
        clash = inputs.get(Path(p.output_file).resolve())
        if clash:
            problems.append(f"OUTPUT_FILE={p.output_file} is your {clash}; predictions would replace it: choose "
                            "another OUTPUT_FILE, or leave it empty for <INPUT_FILE stem>.pred.jsonl")
    adapter = p.adapter_dir.strip()
    if adapter and adapter.lower() != "none" and not Path(adapter).is_dir():
        problems.append(f"ADAPTER_DIR={adapter}: no such directory; train first (`make train`), point ADAPTER_DIR "
                        "at a run's OUTPUT_DIR, or use ADAPTER_DIR=none for the base model")
    return problems


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
