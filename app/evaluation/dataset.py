"""Which records `make evaluate` scores, said in one line that names the file and the count.

EVAL_PATH when it is set. Otherwise a trained run (the adapter dir, or the run it sits in: best/, merged/,
merged/onnx/) is scored on the records it held out: its VAL_PATH file, or its validation split of DATA_PATH,
rebuilt from its train_config.json (SEED, MAX_SAMPLES, VAL_SIZE, DATA_FORMAT ...) through the functions its
training split with (app/data/heldout.py), without tokenizing. The data file's fingerprint and the held-out
records' digest in its data_report.json tell whether the file changed since: one warning line if so. A run
that held out nothing is scored on the first records of its training file, with a warning that says so.
The base model (ADAPTER_DIR=none), or a folder that is no run of this tool, gets VAL_PATH, else data/dev.jsonl.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Config, Setting
from app.core.errors import UserError
from app.data.heldout import digest, held_out
from app.data.record_sources import fingerprint, is_dataset
from app.data.records import Example, read_examples
from app.models.artifacts import parse_json, read_json

if TYPE_CHECKING:
    from app.config.fields import DataArgs

log = logging.getLogger(__name__)

DEFAULT_PATH = "data/dev.jsonl"  # what `make data` writes beside the sample training data
FALLBACK_RECORDS = 200  # a run that held out nothing: this many of its training records (a split's largest size)
RUN_SETTINGS: tuple[Setting, ...] = (
    "DATA_PATH",
    "VAL_PATH",
    "DATA_FORMAT",
    "MAX_SAMPLES",
    "VAL_SIZE",
    "MAX_BAD_RATIO",
    "MAX_SEQ_LEN",
    "SEED",
)
ANOTHER = "EVAL_PATH=<file> to score another file"


@dataclass
class EvalData:
    path: str  # the file the records come from
    examples: list[Example]  # the records scored: each with a prompt and a reference answer
    max_seq_len: int  # the loss is taken on samples cut as training cut them: the run's MAX_SEQ_LEN


def eval_data(cfg: Config, adapter: Path | None) -> EvalData:
    """The records to score with ``adapter`` (None: the base model), logged in one line."""
    d = cfg.data
    if cfg.evaluation.eval_path:
        path = cfg.evaluation.eval_path
        examples = _scorable(read_examples(path, d.data_format, d.max_bad_ratio, "EVAL_PATH")[0], "EVAL_PATH", path)
        return _announce(cfg, path, examples, f"of EVAL_PATH={path}", "", d.max_seq_len)
    run = run_dir(adapter)
    if run is not None:
        return _run_records(cfg, run)
    path, setting = (d.val_path, "VAL_PATH") if d.val_path else (DEFAULT_PATH, "EVAL_PATH")
    who = (
        "ADAPTER_DIR=none, the base model"
        if adapter is None
        else f"ADAPTER_DIR={adapter} holds no train_config.json of a run"
    )
    examples = _scorable(read_examples(path, d.data_format, d.max_bad_ratio, setting)[0], setting, path)
    return _announce(
        cfg, path, examples, f"of {path}", f"{who}: VAL_PATH, else {DEFAULT_PATH}; {ANOTHER}", d.max_seq_len
    )


def run_dir(adapter: Path | None) -> Path | None:
    """The training run ``adapter`` comes from: itself, or the run folder it sits in (best/, merged/,
    merged/onnx/), whichever holds the train_config.json that training writes; None for the base model."""
    if adapter is None:
        return None
    return next(
        (p for p in (adapter, adapter.parent, adapter.parent.parent) if (p / "train_config.json").is_file()), None
    )


def _run_records(cfg: Config, run: Path) -> EvalData:
    saved = read_json(run / "train_config.json", f"ADAPTER_DIR={run}")
    as_run = Config().replace({k: saved[k] for k in RUN_SETTINGS if k in saved})
    d, seed = as_run.data, as_run.train.seed
    seq = cfg.data.max_seq_len if "MAX_SEQ_LEN" in cfg.explicit else d.max_seq_len
    report, _ = parse_json(run / "data_report.json")
    report = report if isinstance(report, dict) else {}  # a run of an older version records no fingerprints
    held, prints = report.get("held_out") or {}, report.get("fingerprints") or {}
    setting, path = ("VAL_PATH", d.val_path) if d.val_path else ("DATA_PATH", d.data_path)
    if not Path(path).exists() and not is_dataset(path):
        raise UserError(
            f"ADAPTER_DIR={run}: the {setting}={path} it trained with is gone, so the records it held "
            f"out cannot be rebuilt; restore the file, or set EVAL_PATH=<file> to choose what to score"
        )
    same = prints[setting] == fingerprint(path) if setting in prints else None
    if d.val_path:
        examples = read_examples(path, d.data_format, d.max_bad_ratio, "VAL_PATH")[0]
    else:
        examples = held_out(d, seed, held.get("cache") if same else None)  # the cache only for the same file
    _check(run, setting, path, same, held.get("digest"), examples)
    if not examples:
        return _training_records(cfg, run, d, seq)
    examples = _scorable(examples, setting, path)
    if d.val_path:
        return _announce(cfg, path, examples, f"of {path}, the VAL_PATH {run} validated on", ANOTHER, seq)
    return _announce(cfg, path, examples, f"{run} held out of {path}", f"its validation split; {ANOTHER}", seq)


def _check(
    run: Path, setting: str, path: str, same: bool | None, recorded: str | None, examples: list[Example]
) -> None:
    """One line when the held-out records cannot be vouched for: the data file changed, or the rebuilt split
    differs from the one recorded at training time."""
    fix = "restore that file, or set EVAL_PATH=<file> to choose what to score"
    if same is None:
        log.info(
            "%s recorded no fingerprint of its %s (an older version trained it): cannot check that %s is "
            "unchanged since",
            run,
            setting,
            path,
        )
    elif not same:
        log.warning(
            "%s=%s has changed since %s trained on it (the fingerprint in its data_report.json differs): "
            "the records scored may not be the ones it held out; %s",
            setting,
            path,
            run,
            fix,
        )
    elif recorded and digest(examples) != recorded:
        log.warning(
            "the records rebuilt from %s=%s differ from those %s held out (the digest in its "
            "data_report.json): the records scored may not be the ones it held out; %s",
            setting,
            path,
            run,
            fix,
        )


def _training_records(cfg: Config, run: Path, d: DataArgs, seq: int) -> EvalData:
    """A run that held out nothing: the first records of its training file, which it saw, said as a warning."""
    why = "VAL_SIZE=0 and no VAL_PATH" if d.val_size <= 0 else "too few records to split off a validation set"
    n = cfg.evaluation.eval_samples or FALLBACK_RECORDS
    examples, _ = read_examples(d.data_path, d.data_format, d.max_bad_ratio, "DATA_PATH", limit=n)
    examples = _scorable(examples, "DATA_PATH", d.data_path)
    log.warning(
        "%s held out no records (%s): evaluating the first %d records of its training file %s instead, "
        "which it trained on, so the scores flatter it; set EVAL_PATH=<file> to score records it has not "
        "seen",
        run,
        why,
        len(examples),
        d.data_path,
    )
    return EvalData(d.data_path, examples, seq)


def _scorable(examples: list[Example], setting: str, path: str) -> list[Example]:
    """The records with a separate answer to score ({text} records have none)."""
    kept = [e for e in examples if e.messages]
    if not kept:
        raise UserError(
            f"{setting}={path}: no record with a prompt and an answer to score ({len(examples)} "
            "{text} records); set EVAL_PATH to a file of prompts with answers"
        )
    return kept


def _announce(cfg: Config, path: str, examples: list[Example], what: str, why: str, seq: int) -> EvalData:
    """EVAL_SAMPLES of the records (all when 0), and the one line: how many, of which file, and why that one."""
    k, total = cfg.evaluation.eval_samples, len(examples)
    examples = examples[:k] if k else examples
    cut = len(examples) < total
    why = "; ".join(s for s in (f"EVAL_SAMPLES={k}" if cut else "", why) if s)
    log.info(
        "evaluating %s records %s%s",
        f"{len(examples)} of the {total}" if cut else f"the {total}",
        what,
        f" ({why})" if why else "",
    )
    return EvalData(path, examples, seq)
