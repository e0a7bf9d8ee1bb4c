"""Which directory a command reads (an adapter, a full model or merge, an ONNX export, the base model)
and where it came from, so that a damaged one gets the right fix (``fix_for``). No torch.

Whether the files in such a directory are whole is app.models.integrity, which builds on this.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app.config import Config, Setting
from app.core import ownership
from app.core.errors import UserError

ONNX_FILE, ONNX_DATA, META_FILE = "model.onnx", "model.onnx.data", "onnx_export.json"
log = logging.getLogger(__name__)


# ---- which directory a command reads ---------------------------------------------------------------


def find_adapter(cfg: Config) -> Path | None:
    """ADAPTER_DIR, else the last training's output, else OUTPUT_DIR; None for 'none'. A last-run pointer
    whose run is gone (deleted by hand) moves to the newest remaining run, with a warning."""
    from app.models.run_dirs import last_run, repoint

    choice = cfg.predict.adapter_dir.strip()
    if choice.lower() == "none":
        return None
    if not choice:
        named = last_run()
        if named is not None and not named.exists():
            log.warning("%s", repoint(named, "gone"))
            named = last_run()
        choice = str(named) if named is not None else ""
    path = Path(choice or cfg.train.output_dir)
    if not choice and not (path / "adapter_config.json").is_file() and not is_full_model(path):
        raise UserError(
            f"no trained run to use: ADAPTER_DIR is not set, no last run is recorded "
            f"(models/.last_run), and OUTPUT_DIR={path} holds no adapter; train first (`make train`), "
            "set ADAPTER_DIR=<a run dir>, or ADAPTER_DIR=none for the base model"
        )
    if not (path / "adapter_config.json").is_file() and not is_full_model(path):
        raise UserError(
            f"ADAPTER_DIR={path}: no adapter_config.json there; train first (`make train`), "
            "point ADAPTER_DIR at an adapter dir, or use ADAPTER_DIR=none for the base model"
        )
    return path


# The settings naming what a command reads: no folder the tool writes into may be, or hold, one of them
# (app.core.ownership.refused_why). RESUME is not one: it names a checkpoint inside the run itself.
READ_SETTINGS: tuple[Setting, ...] = (
    "DATA_PATH",
    "VAL_PATH",
    "EVAL_PATH",
    "INPUT_FILE",
    "PREDICTIONS",
    "MODEL_NAME",
    "DS_CONFIG",
)


def read_paths(cfg: Config) -> dict[str, str]:
    """``SETTING=value`` -> local path of each input the settings name (MODEL_NAME's tiny names as their
    dirs; a hub model name, which is no local path, left out)."""
    from app.models.tiny import FAMILIES, tiny_dir

    out = {}
    for var in READ_SETTINGS:
        value = str(cfg.get(var) or "").strip()
        path = str(tiny_dir(value)) if var == "MODEL_NAME" and value in FAMILIES else value
        if value and (var != "MODEL_NAME" or Path(path).expanduser().exists()):
            out[f"{var}={value}"] = path
    return out


def output_problem(cfg: Config, folder: str | Path, setting: str, kind: str, instead: str = "") -> str | None:
    """Why the command may not write into ``folder`` as its ``kind`` folder (app.core.ownership), or None."""
    refused = ownership.refused_why(folder, read_paths(cfg))
    return ownership.write_problem(folder, setting, kind, refused, instead)


def is_full_model(path: Path) -> bool:
    """A standalone model (a METHOD=full output, a merge, an ONNX export), not an adapter."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def is_onnx_dir(path: str | Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file() and (Path(path) / META_FILE).is_file()


def read_json(path: Path, label: str) -> dict[str, Any]:
    """The parsed JSON object, or the one-line UserError that says the file is damaged and what to do."""
    data, why = parse_json(path)
    why = why or (None if isinstance(data, dict) else "not a JSON object")
    if why:
        raise UserError(problem_line(label, [file_problem(path.name, why)], fix_for(path.parent)))
    return data


def base_model_for(cfg: Config, adapter: Path | None) -> tuple[str, str]:
    """(MODEL_NAME, QUANT_LEVEL): as trained, unless set explicitly now.

    An adapter is most faithful on the base it was trained against, quantization included.
    """
    saved: dict = {}
    if adapter is not None and is_full_model(adapter):
        return str(adapter), "none"  # the trained model itself is the base
    if adapter is not None and (adapter / "train_config.json").is_file():
        saved = read_json(adapter / "train_config.json", f"ADAPTER_DIR={adapter}")
    elif adapter is not None:
        saved = {
            "MODEL_NAME": read_json(adapter / "adapter_config.json", f"ADAPTER_DIR={adapter}").get(
                "base_model_name_or_path"
            )
        }
    name = cfg.model.model_name if "MODEL_NAME" in cfg.explicit else saved.get("MODEL_NAME") or cfg.model.model_name
    quant = cfg.resources.quant_level if "QUANT_LEVEL" in cfg.explicit else saved.get("QUANT_LEVEL", "none")
    return name, "none" if quant == "auto" else quant


def local_model_problem(name: str) -> str | None:
    """The one-line problem when MODEL_NAME can only be a local path and is not there (no hub asked)."""
    if _is_local_path(name) and not Path(name).expanduser().exists():
        return (
            f"MODEL_NAME={name}: no such directory; point MODEL_NAME at a local model dir "
            "(config.json, weights, tokenizer), a hub name (owner/name), or tiny"
        )
    return None


def _is_local_path(name: str) -> bool:
    """'/x/y', './x', '~/x', 'a/b/c', or 'models/x' when ./models is a local dir: not a hub name."""
    parts = Path(name).parts
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in name
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )


def replace_target_problem(cfg: Config | None, folder: str | Path, marker: str, setting: str) -> str | None:
    """Why a result written whole (a merge, an ONNX export: ``marker`` in it) may not replace ``folder``
    (``cfg``: the command's settings, whose inputs it may not hold; None: only the project's own folders)."""
    from app.core.atomic import replace_problem

    refused = ownership.refused_why(folder, read_paths(cfg) if cfg is not None else {})
    return ownership.refused_line(folder, setting, refused) if refused else replace_problem(folder, marker, setting)


def fp32_bytes(model_dir: str | Path) -> int | None:
    """The size of a local model's weights in fp32 (how merge and export-onnx write them), or None when they are
    not at hand (a hub name)."""
    folder = Path(model_dir)
    files = (
        [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()] if folder.is_dir() else []
    )
    if not files:
        return None
    config, _ = parse_json(folder / "config.json")
    stored = str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "float32")
    return sum(p.stat().st_size for p in files) * (2 if stored in ("bfloat16", "float16") else 1)


# ---- reading a file, and what to do when it is damaged -----------------------------------------------


def parse_json(path: Path) -> tuple[Any, str | None]:
    """(parsed data, None) or (None, why it is damaged)."""
    try:  # parsed whole: the largest tokenizer.json files (~20 MB) take ~0.2 s
        data = path.read_bytes()
        return (json.loads(data), None) if data else (None, "empty: 0 bytes")
    except FileNotFoundError:
        return None, "missing"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg}: line {e.lineno} column {e.colno}"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except OSError as e:
        return None, f"cannot be read: {e.strerror}"


def file_problem(name: str, why: str) -> str:
    return f"{name} is missing" if why == "missing" else f"{name} is damaged ({why})"


def problem_line(label: str, found: list[str], fix: str) -> str:
    return f"{label}: {', '.join(found)}; {fix}"


def fix_for(path: Path) -> str:
    """What to do about a damaged dir, by where it came from."""
    from app.models.tiny import FAMILIES, tiny_dir

    path = Path(path)
    if (path / META_FILE).exists() or (path / ONNX_FILE).exists():
        meta, _ = parse_json(path / META_FILE)
        src = Path(meta["source"]) if isinstance(meta, dict) and meta.get("source") else None
        if src is None:
            return f"export it again: `make export-onnx ADAPTER_DIR=<the merged model> ONNX_DIR={path}`"
        where = "" if path == src / "onnx" else f" ONNX_DIR={path}"
        return (
            f"export it again: `make export-onnx ADAPTER_DIR={src}{where}`"
            if is_full_model(src)
            else f"export it again: `make export-onnx ADAPTER_DIR=none MODEL_NAME={src}{where}`"
        )
    if (path / "train_config.json").exists() or (path / "adapter_config.json").exists():
        return "restore it from a copy, or train again into that OUTPUT_DIR with OVERWRITE=1"
    if (path.parent / "adapter_config.json").exists():  # a merge (MERGED_DIR defaults to <adapter>/merged)
        where = "" if path.name == "merged" else f" MERGED_DIR={path}"
        return f"merge again: `make merge ADAPTER_DIR={path.parent}{where}`"
    if any(path.resolve() == tiny_dir(f).resolve() for f in FAMILIES):
        return f"delete {path} (`make clean` removes the tiny models); the next command rebuilds it"
    return (
        f"copy the model again, or delete the damaged file and download it again: `.venv/bin/hf download "
        f"<owner>/{path.name} --local-dir {path}` (fetches only what is missing)"
    )


def onnx_is_stale(path: Path) -> Path | None:
    """The model an ONNX export came from, when that model was written after the export (a re-merge)."""
    meta, _ = parse_json(Path(path) / META_FILE)
    if not (isinstance(meta, dict) and meta.get("source")):
        return None
    src = Path(meta["source"]) / "config.json"
    try:
        newer = src.stat().st_mtime > (Path(path) / META_FILE).stat().st_mtime
    except OSError:
        return None
    return src.parent if newer else None
