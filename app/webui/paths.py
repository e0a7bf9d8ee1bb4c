"""Where the web UI may read and write: the data/ and models/ dirs of the project it runs in, nothing else.

A browser is a remote client, even on 127.0.0.1: whatever it types into a path field is checked here
before any command sees it (``..``, an absolute path or a symlink that leads out of those dirs is refused,
in one line naming the setting), and an upload lands only in data/, under a new name, after the same
checks the command line makes on a data file. An upload never replaces a file.
Standard library only (app.data reads the records without torch).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Config
from app.core.errors import UserError
from app.serve.adapters import inside

DATA, MODELS, CONFIGS = "data", "models", "configs"
DATA_TYPES = (".jsonl", ".json", ".csv", ".txt")  # what DATA_PATH reads (app/data/record_sources.py)
# Every setting that names a file or a dir, and the project dirs it must lie in. tests/webui/test_webui.py keeps
# this complete: a new *_PATH, *_DIR or *_FILE setting fails it until it is listed here.
PATH_SETTINGS: dict[str, tuple[str, ...]] = {
    "DATA_PATH": (DATA,),
    "VAL_PATH": (DATA,),
    "EVAL_PATH": (DATA,),
    "INPUT_FILE": (DATA,),
    "PREDICTIONS": (DATA, MODELS),
    "OUTPUT_FILE": (DATA, MODELS),
    "OUTPUT_DIR": (MODELS,),
    "CACHE_DIR": (MODELS,),
    "ADAPTER_DIR": (MODELS,),
    "MERGED_DIR": (MODELS,),
    "ONNX_DIR": (MODELS,),
    "GGUF_DIR": (MODELS,),
    "EVAL_DIR": (MODELS,),
    "MODEL_NAME": (MODELS,),
    "DS_CONFIG": (CONFIGS,),
}
# Values of those settings that are words, not paths.
WORDS = {"ADAPTER_DIR": ("none",)}


def project() -> Path:
    """The project the UI serves: its working dir (the Makefile's and the container's /app)."""
    return Path.cwd()


def path_problem(setting: str, value: str) -> str | None:
    """One line when ``value`` of a path ``setting`` leads outside its project dirs, else None. MODEL_NAME
    is a path only when it looks like one (absolute, ``./``, ``..``) or names a local dir; a hub name
    (``THUDM/glm-edge-1.5b-chat``) or a tiny model's name is not."""
    value = value.strip()
    roots = PATH_SETTINGS.get(setting)
    if not roots or not value or value in WORDS.get(setting, ()):
        return None
    if setting == "MODEL_NAME" and not _looks_like_path(value):
        return None
    if any(inside(project() / root, project() / value) for root in roots):
        return None
    where = " or ".join(f"{r}/" for r in roots)
    return (
        f"{setting}={value}: the web UI reads and writes only inside this project's {where}; "
        f"use a path there (upload data on the Train tab), or the command line for other places"
    )


def _looks_like_path(value: str) -> bool:
    p = Path(value)
    return p.is_absolute() or value.startswith(".") or ".." in p.parts or (project() / p).exists()


def path_problems(values: dict[str, str]) -> list[str]:
    return [line for var, value in values.items() if (line := path_problem(var, str(value)))]


def data_files() -> list[str]:
    """The data files under data/ (relative paths), for the pickers."""
    root = project() / DATA
    found = [p for p in root.rglob("*") if p.suffix in DATA_TYPES and p.is_file() and not p.name.startswith(".")]
    return sorted(str(p.relative_to(project())) for p in found)


@dataclass(frozen=True)
class DataSummary:
    path: str
    format: str
    records: int
    valid: int
    bad: int
    first_bad: str
    partial: bool = False  # a big file: its first QUICK_LOOK_RECORDS only, as the pre-flight reads it
    shape: str = ""  # preference records: which of their shapes (shape_of)
    good: int = 0  # KTO records labelled good (of ``valid``)

    def kind(self) -> str:
        """What the records are, as a user reads it: "format context_target", "preference pairs (plain:
        prompt/chosen/rejected)", "KTO records (prompt/completion/label; 3 good, 1 bad)"."""
        if self.format == "preference":
            return f"preference pairs ({self.shape})"
        if self.format == "kto":
            return f"KTO records ({self.shape}; {self.good:,} good, {self.valid - self.good:,} bad)"
        return f"format {self.format}"

    def line(self, stage: str = "") -> str:
        """The summary line, and under it, for ``stage`` (STAGE), the line training gives when the records do
        not fit it."""
        of = (
            f"the first {self.records:,} records (a big file: training reads it whole)"
            if self.partial
            else f"{self.records:,} records"
        )
        s = f"{self.path}: {self.valid:,} valid of {of}, {self.kind()}"
        s += f"; {self.bad:,} bad ({self.first_bad})" if self.bad else "; no bad lines"
        fit = self.stage_fit(stage) if stage else ""
        return s + ("\n" + fit if fit else "")

    def stage_fit(self, stage: str) -> str:
        """ "" when STAGE=``stage`` trains on these records as they are, else one line: training's own refusal
        (app.data.records.check_stage), or how STAGE=kto reads pairs."""
        from app.data.records import LoadReport, check_stage, stage_of_format

        have = stage_of_format(self.format)
        if have == stage:
            return ""
        if stage == "kto" and have == "dpo":  # check_stage logs this case; the page says it instead
            return (
                f"STAGE=kto trains each pair as a good and a bad answer ({2 * self.valid:,} records); "
                "STAGE=dpo trains on them as pairs"
            )
        try:
            check_stage(LoadReport(self.path, self.format), stage)
        except UserError as e:
            return "\n".join(e.problems)
        return ""


# The shapes of preference records (docs/data.md#preference-data-stagedpo-and-stagekto), by the first record's
# fields, in the order app/data/preference_records.py tries them.
PAIR_SHAPES = (
    ("conversations", "LLaMA-Factory sharegpt: conversations + chosen/rejected"),
    ("messages", "LLaMA-Factory messages + chosen/rejected"),
    ("instruction", "LLaMA-Factory alpaca: instruction/input + chosen/rejected"),
)


def shape_of(rec: dict[str, Any], fmt: str) -> str:
    """Which shape of a ``preference`` or ``kto`` record ``rec`` is (else "")."""
    turns = any(isinstance(rec.get(k), (list, dict)) for k in ("prompt", "chosen", "rejected", "completion"))
    if fmt == "kto":
        return "TRL conversational: prompt/completion/label turns" if turns else "prompt/completion/label"
    if fmt != "preference":
        return ""
    shape = next((name for key, name in PAIR_SHAPES if key in rec), None)
    if shape:
        return shape
    if "prompt" in rec:
        return "TRL conversational: prompt/chosen/rejected turns" if turns else "plain: prompt/chosen/rejected"
    return "TRL implicit prompt: chosen/rejected conversations"


def inspect_data(path: str, setting: str = "DATA_PATH", data_format: str = "auto", shown_as: str = "") -> DataSummary:
    """The format (a preference file's shape), record count and bad lines of a data file, by the checks training
    makes on it, in one pass: a problem is the command line's own one-line UserError (with ``shown_as`` for the
    path in it, for an upload)."""
    from app.cli.preflight import QUICK_LOOK_MB, QUICK_LOOK_RECORDS
    from app.data.record_sources import iter_source
    from app.data.records import LoadReport, examples_of, judge

    partial = Path(path).is_file() and Path(path).stat().st_size > QUICK_LOOK_MB * 2**20
    first: list[dict[str, Any]] = []  # the record the format is told from

    def peek(raw: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        for item in raw:
            if not first and isinstance(item[1], dict):
                first.append(item[1])
            yield item

    report, good = LoadReport(str(path), data_format), 0
    try:
        raw = iter_source(path, setting)
        for ex, _ in examples_of(
            peek(itertools.islice(raw, QUICK_LOOK_RECORDS) if partial else raw), data_format, str(path), setting, report
        ):
            good += ex.label is True
        judge(report, setting, None, warn=False)  # every bad record is counted and shown: no ratio refuses
    except UserError as e:
        raise UserError([line.replace(str(path), shown_as) if shown_as else line for line in e.problems]) from None
    return DataSummary(
        shown_as or path,
        report.format,
        report.total,
        report.valid,
        report.bad_count,
        report.first_bad(),
        partial,
        shape_of(first[0], report.format) if first else "",
        good,
    )


def save_upload(tmp: str, cfg: Config) -> DataSummary:
    """Copy an uploaded file (Gradio's temp copy) into data/ under its own name, after the command line's checks
    on it; a file already there is never replaced (the same bytes: that file is used). One-line UserError
    for a wrong type, an oversized, non-UTF-8, empty or unreadable file: then nothing is written."""
    src = Path(tmp)
    name = re.sub(r"[^\w.\-]+", "_", src.name).lstrip(".") or "upload.jsonl"
    dest = project() / DATA / name
    shown = f"{DATA}/{name}"
    if src.suffix.lower() not in DATA_TYPES:
        raise UserError(f"DATA_PATH={shown}: unsupported file type {src.suffix!r}; use .jsonl, .json, .csv or .txt")
    limit = cfg.webui.webui_max_upload_mb
    if src.stat().st_size > limit * 2**20:
        raise UserError(
            f"DATA_PATH={shown}: {src.stat().st_size / 2**20:,.0f} MB is over WEBUI_MAX_UPLOAD_MB={limit}; "
            "copy the file into data/ and pick it, or raise WEBUI_MAX_UPLOAD_MB"
        )
    summary = inspect_data(str(src), shown_as=shown)
    if dest.exists():
        if dest.is_file() and _same_bytes(src, dest):
            return summary
        raise UserError(
            f"DATA_PATH={shown}: a different file of that name is already in data/ and is never "
            "replaced; rename your file, or pick the one in data/"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".upload")  # a new name: ours
    os.close(fd)
    part = Path(tmp_name)
    try:  # a failed copy (a full disk) leaves no part behind either
        shutil.copyfile(src, part)
        os.link(part, dest)  # fails if the name was taken meanwhile: nothing is replaced
    except FileExistsError:
        raise UserError(f"DATA_PATH={shown}: a file of that name appeared in data/ meanwhile; upload again") from None
    finally:
        part.unlink(missing_ok=True)
    return summary


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while chunk := fa.read(1 << 20):
            if chunk != fb.read(len(chunk)):
                return False
    return True
