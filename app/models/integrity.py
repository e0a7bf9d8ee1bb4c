"""A damaged or half-written file of a model, adapter or ONNX export dir, named in one line with its fix,
before anything loads. No torch.

A truncated adapter_model.safetensors or a half-written JSON file otherwise ends in a library
traceback (``SafetensorError: invalid header length``, ``JSONDecodeError``) that names neither the
file nor what to do. These checks are cheap enough for the pre-flight: every JSON file a load will
read is parsed, and of a ``*.safetensors`` file only the header is read (8-byte length, JSON, then
the size the header promises is compared with the file's), never the weights, which are GBs for a
6B model. Each damaged directory gives ONE line: its setting, the damaged files and the fix, which
depends on where the directory came from (app.models.artifacts.fix_for: a training run, a merge, an
export, a tiny model, a copy or download). ``load_failure`` is the backstop where the libraries load:
a file the checks pass (right size, bad bytes) may still fail there, and then the user gets a line
too, not a traceback.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import UserError
from app.models.artifacts import (
    META_FILE,
    ONNX_DATA,
    ONNX_FILE,
    file_problem,
    fix_for,
    local_model_problem,
    parse_json,
    problem_line,
)

TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
_HEADER_LIMIT = 100_000_000  # what the safetensors library itself accepts
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "C64": 8,
}
# Exceptions a damaged file raises inside the loaders (by name: their modules need torch or are optional).
_DAMAGE_ERRORS = {
    "SafetensorError",
    "JSONDecodeError",
    "UnicodeDecodeError",
    "UnpicklingError",
    "EOFError",
    "InvalidProtobuf",
    "InvalidGraph",
    "DecodeError",
}


# ---- is it intact -------------------------------------------------------------------------------------


def model_problems(name: str, label: str | None = None, weights: bool = True) -> list[str]:
    """MODEL_NAME ``name``: a local path that is not there, a local dir (tiny once built) with damaged or
    missing files, or a hub name the hub is out of reach for whose local HF cache copy has no weights. Any
    other hub name is left to the load, which may fetch it. ``weights=False`` (make info, which plans from
    the config alone): weights not there yet are no problem; weights_missing names them."""
    label = label or f"MODEL_NAME={name}"
    missing = local_model_problem(name)
    if missing:
        return [missing]
    path = _local_dir(name)
    if path is not None:
        return dir_problems(path, label, weights)
    gap = weights_missing(name) if weights else None
    return [gap.problem(label)] if gap else []


@dataclass(frozen=True)
class MissingWeights:
    """Weights a load of MODEL_NAME ``name`` could not get: ``found``, one entry per missing file; ``command``, the
    shell command that fetches them ('' where the fix is another, in ``after``), then ``after``; ``offline``,
    for a hub name whose config is in the local HF cache, why the hub is out of reach."""

    name: str
    found: list[str]
    command: str
    after: str
    offline: str = ""

    def problem(self, label: str) -> str:
        """train's one line for a hub name (a local dir's is dir_problems')."""
        return (
            f"{label}: the local HF cache holds its config but not its weights ({', '.join(self.found)}), and "
            f"the hub is out of reach ({self.offline}); download it once where the hub is reachable: "
            f"`{self.command}`, {self.after}"
        )

    def notice(self) -> str:
        """make info's lines after the plan, which came from the config alone."""
        where = (
            f"; the local HF cache holds only {self.name}'s config and tokenizer, and the hub is out of reach "
            f"({self.offline})"
            if self.offline
            else f", in {self.name}"
        )
        head = (
            f"weights: not here yet: {'; '.join(self.found)}{where}. Everything above is planned from the config "
            "alone; `make train` needs the weights"
        )
        if not self.command:
            return f"{head}: {self.after}"
        reachable = " where the hub is reachable" if self.offline else ""
        return f"{head}. Fetch them{reachable}:\n  {self.command}\n{self.after}"


def weights_missing(name: str) -> MissingWeights | None:
    """The weights MODEL_NAME ``name`` lacks where a load would look for them: its local dir (config.json there),
    or for a hub name the hub is out of reach for, the local HF cache that holds its config. None when they
    are there, or a load may still fetch them."""
    from app.core.hub import cached_model_dir, download_command, hub_out_of_reach
    from app.models.tiny import FAMILIES

    path, offline = _local_dir(name), ""
    if path is None and name not in FAMILIES:  # a tiny model not built yet is built, not fetched
        offline = hub_out_of_reach() or ""
        path = cached_model_dir(name) if offline else None
    if path is None or not (path / "config.json").is_file():
        return None
    found = _weight_files(path)[0]
    if not found:
        return None
    if offline:
        command, local = download_command(name)
        return MissingWeights(name, found, command, f"then use MODEL_NAME={local}", offline)
    fix = fix_for(path)
    if "hf download" not in fix:  # a tiny model or a merge: built again, not fetched
        return MissingWeights(name, found, "", fix)
    return MissingWeights(
        name,
        found,
        f".venv/bin/hf download <owner>/{path.name} --local-dir {path}",
        f"(<owner>/{path.name}: the model's name on the hub; only the missing files are fetched)",
    )


def _local_dir(name: str) -> Path | None:
    from app.models.tiny import FAMILIES, tiny_dir

    path = tiny_dir(name) if name in FAMILIES else Path(name).expanduser()
    return path if path.is_dir() else None


def dir_problems(path: Path, label: str, weights: bool = True) -> list[str]:
    """[one line] naming every damaged or missing file of the model/adapter/ONNX dir ``path``; [] if intact.
    ``weights=False``: a model dir's weights that are not there are left out (damaged ones are not)."""
    unreadable = [p for p in sorted(path.iterdir()) if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable:  # not damage: deleting or re-downloading would be the wrong advice
        st = unreadable[0].stat()
        return [
            f"{label}: cannot read {', '.join(p.name for p in unreadable)} (permission denied: owned by uid "
            f"{st.st_uid}, mode {stat.filemode(st.st_mode)}; written by another user, e.g. a container run as "
            f"another uid); make them readable, e.g. sudo chown -R $(id -u):$(id -g) {path}"
        ]
    if (path / META_FILE).exists() or (path / ONNX_FILE).exists():
        found = _onnx_files(path)
    elif (path / "adapter_config.json").exists():
        found = _adapter_files(path)
    else:
        found = _model_files(path, weights)
    return [problem_line(label, found, fix_for(path))] if found else []


def _adapter_files(path: Path) -> list[str]:
    found = _json_files(path, [("adapter_config.json", "peft_type"), ("train_config.json", "")])
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        found += _safetensors_files([weights])
    elif not (path / "adapter_model.bin").exists():
        found.append(f"{weights.name} is missing")
    if (path / "tokenizer_config.json").exists():  # predict and merge then load the tokenizer from here
        found += _json_files(path, [(name, None) for name in TOKENIZER_JSON])
    return found


def _model_files(path: Path, weights: bool = True) -> list[str]:
    if not (path / "config.json").exists():
        return ["config.json is missing"]
    found = _json_files(path, [("config.json", "")] + [(n, None) for n in ("generation_config.json", *TOKENIZER_JSON)])
    missing, damaged = _weight_files(path)
    return found + (missing if weights else []) + damaged


def _weight_files(path: Path) -> tuple[list[str], list[str]]:
    """(the missing, the damaged) weight files of the model dir ``path``, one entry each."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        data, why = parse_json(index)
        if why:
            return [], [f"{index.name} is damaged ({why})"]
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            return [], [f"{index.name} is damaged (no weight_map in it)"]
        shards = sorted({str(s) for s in weight_map.values()})
        return (
            [f"{s} is missing (named in {index.name})" for s in shards if not (path / s).exists()],
            _safetensors_files([path / s for s in shards if (path / s).exists()]),
        )
    if (path / "model.safetensors").exists():
        return [], _safetensors_files([path / "model.safetensors"])
    if not any(path.glob("*.bin")) and not any(path.glob("*.pt")):
        return ["model.safetensors is missing (no weights at all)"], []
    return [], []


def _onnx_files(path: Path) -> list[str]:
    meta, why = parse_json(path / META_FILE)
    found = [file_problem(META_FILE, why)] if why else []
    if not why and not (isinstance(meta, dict) and {"inputs", "past_shape", "architecture"} <= set(meta)):
        found.append(f"{META_FILE} is damaged (not the export's description)")
    sizes = meta.get("files") if isinstance(meta, dict) else None  # recorded by exports since issue 15
    sizes = sizes if isinstance(sizes, dict) else {}
    for name in (ONNX_FILE, *([ONNX_DATA] if ONNX_DATA in sizes else [])):
        if not (path / name).is_file():
            found.append(f"{name} is missing")
        elif name in sizes and (path / name).stat().st_size != sizes[name]:
            found.append(f"{name} is damaged ({_size_why((path / name).stat().st_size, sizes[name])})")
    return found + _json_files(
        path, [("config.json", ""), *[(n, None) for n in ("generation_config.json", *TOKENIZER_JSON)]]
    )


def _json_files(path: Path, names: list[tuple[str, str | None]]) -> list[str]:
    """Each present file of ``names`` must parse; key '' = must be an object, 'x' = an object with x."""
    found = []
    for name, need in names:
        if not (path / name).exists():
            continue
        data, why = parse_json(path / name)
        if not why and need is not None and not isinstance(data, dict):
            why = "not a JSON object"
        elif not why and need and need not in data:
            why = f"no {need} in it"
        if why:
            found.append(f"{name} is damaged ({why})")
    return found


def _safetensors_files(paths: list[Path]) -> list[str]:
    return [f"{p.name} is damaged ({why})" for p in paths for why in [safetensors_problem(p)] if why]


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, from its header alone; None when it is."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"truncated: {size:,} bytes, not even a header"
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT:
                return f"invalid header length {n:,}"
            if 8 + n > size:
                return f"truncated: {size:,} bytes, shorter than its {n:,}-byte header"
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return "its header is not valid JSON"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            count = 1
            for d in t["shape"]:
                count *= int(d)
        except (TypeError, KeyError, ValueError):
            return f"its header entry for {name} is malformed"
        width = _DTYPE_BYTES.get(t.get("dtype"))
        if stop < begin or (width is not None and stop - begin != count * width):
            return f"its header entry for {name} does not match its shape"
        end = max(end, stop)
    return None if size == 8 + n + end else _size_why(size, 8 + n + end)


def _size_why(size: int, expected: int) -> str:
    if size < expected:
        return f"truncated: {size:,} of {expected:,} bytes"
    extra = size - expected
    return f"{extra:,} byte{'s' * (extra != 1)} longer than it should be ({expected:,})"


# ---- where the libraries load ------------------------------------------------------------------------


def load_failure(path: Path, label: str, err: BaseException, any_error: bool = False) -> UserError | None:
    """The backstop for a load that failed on ``path``: the checks' line, or for an error that a damaged
    file raises (any error with ``any_error``), a line naming the dir, and the file where only one can be
    meant; else None (not a damaged file: the caller re-raises)."""
    found = dir_problems(path, label)
    if found:
        return UserError(found)
    name, first = type(err).__name__, (str(err).strip().splitlines() or [""])[0][:160]
    if not any_error and name not in _DAMAGE_ERRORS and "deserializ" not in first:
        return None
    files = [ONNX_FILE] if (path / ONNX_FILE).exists() else sorted(p.name for p in path.glob("*.safetensors"))
    one = len(files) == 1 and name != "JSONDecodeError"  # a JSON error: which of the JSON files is unknown
    what = f"{files[0]} cannot be loaded" if one else "a file cannot be loaded"
    return UserError(problem_line(label, [f"{what} ({name}: {first})"], fix_for(path)))
