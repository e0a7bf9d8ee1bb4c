"""`make export-gguf`: a trained run as one GGUF file for llama.cpp and Ollama, and the same file for
INFER_BACKEND=llama.cpp (``ensure_gguf``: exported once, reused while the adapter and its base are unchanged).

The adapter is merged into its base at the base's own precision (a QLoRA run's from the original base, not
from the 4-bit weights it trained on), llama.cpp's converter writes a 16-bit GGUF, and llama.cpp's quantizer
makes GGUF_QUANT from it. The tokenizer the run trained with (its chat template and EOS) goes into the GGUF's
metadata; an Ollama Modelfile with the same template and stop tokens, and a README with the commands, go
beside it. GGUF_DIR is replaced whole (app.core.atomic.replace_dir): a kill or a full disk leaves the
previous export or none, never a half-written file that llama.cpp would load.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from app.config import Config
from app.core import diskspace, ownership
from app.core.atomic import replace_dir, write_json
from app.core.errors import UserError
from app.inference import llamacpp
from app.inference.gguf_source import Source, bytes_needed, key_for, source_for
from app.models.artifacts import (
    fp32_bytes,
    is_full_model,
    parse_json,
    replace_target_problem,
)

log = logging.getLogger(__name__)

INFO_FILE = "gguf_info.json"  # what was exported, from what: the marker of a dir this tool may replace


def check(cfg: Config, src: Source, quant: str, adapter_only: bool = False) -> None:
    """Every refusal an export can know before it writes anything: GGUF_DIR, the memory a merge needs, the disk."""
    problem = replace_target_problem(cfg, src.out, INFO_FILE, "GGUF_DIR")
    if problem:
        raise UserError(problem)
    if not adapter_only and src.adapter is not None and not is_full_model(src.adapter):
        _check_memory(cfg, src)
    need = bytes_needed(src.base_dir, quant)
    short = need and diskspace.shortfall(
        "GGUF_DIR", src.out, need, f"the export (the merged model and its 16-bit GGUF on the way to {quant})"
    )
    if short:
        raise UserError(short + "; nothing was written")


def run_export_gguf(cfg: Config) -> Path:
    """Export the run (GGUF_QUANT, GGUF_DIR) and return GGUF_DIR."""
    llamacpp.require("make export-gguf")
    quant = cfg.predict.gguf_quant
    src = source_for(cfg)
    check(cfg, src, quant, cfg.predict.gguf_adapter_only)
    return export(cfg, src, quant, cfg.predict.gguf_adapter_only)


ADAPTER_FILE = "adapter-f16.gguf"


def export(cfg: Config, src: Source, quant: str, adapter_only: bool = False) -> Path:
    """Write GGUF_DIR whole: the merged model at ``quant``, or (``adapter_only``) the base at ``quant`` and the
    LoRA as a llama.cpp adapter, with a base of an earlier such export reused when the base is unchanged."""
    from app.inference.gguf_files import write_companions

    adapter = src.adapter if adapter_only and src.adapter is not None and not is_full_model(src.adapter) else None
    lora = adapter is not None
    key = {**key_for(src, quant), "adapter_only": lora}
    name = f"{'base' if lora else 'model'}-{quant}.gguf"
    old, _ = parse_json(src.out / INFO_FILE)
    handle, name_log = tempfile.mkstemp(prefix="export-gguf-", suffix=".log")  # outlives a failed export's folder
    os.close(handle)
    logs = Path(name_log)
    try:
        with replace_dir(src.out, INFO_FILE, "GGUF_DIR") as tmp:
            if src.adapter is not None and src.out.parent == src.adapter:
                ownership.register(src.adapter, [src.out.name])  # gguf/ in a run: remove-run takes it too
            hf = tmp / ".model"
            write_merged(cfg, src, hf, merge=not lora)
            if lora and _reuse_base(old, key, src.out / name, tmp / name):
                log.info("the base %s at %s: reused from the previous export in %s", src.base_name, quant, src.out)
            else:
                to_gguf(hf, tmp / name, quant, cfg.model.num_threads, logs)
            if adapter is not None:
                llamacpp.convert_lora(adapter, hf, tmp / ADAPTER_FILE, logs)
                log.info("the LoRA alone: %s, for llama.cpp's --lora on %s", src.out / ADAPTER_FILE, src.out / name)
            write_companions(
                tmp, name, hf, Path(str(src.adapter or src.base_dir)).name, quant, ADAPTER_FILE if lora else None
            )
            shutil.rmtree(hf)
            write_json(
                tmp / INFO_FILE,
                {
                    "file": name,
                    "key": key,
                    "adapter": str(src.adapter or ""),
                    "base": src.base_name,
                    "base_quantization": src.trained_quant,
                    "size": (tmp / name).stat().st_size,
                },
            )
        logs.unlink()
    except OSError as e:
        if not diskspace.is_full(e, src.out.parent):
            raise
        raise UserError(
            diskspace.full_line(
                "GGUF_DIR",
                src.out,
                "writing the GGUF export",
                bytes_needed(src.base_dir, quant),
                "a previous export there is untouched",
                "run `make export-gguf` again",
            )
        ) from None
    log.info(
        "exported %s -> %s (%s); its Modelfile and README beside it",
        src.adapter or src.base_name,
        src.out / name,
        quant,
    )
    return src.out


def to_gguf(hf: Path, out: Path, quant: str, threads: int, logs: Path) -> None:
    """llama.cpp's converter (16-bit), its metadata checked against config.json, then its quantizer."""
    first = out if quant in llamacpp.CONVERTER_TYPES else out.with_name(".16bit.gguf")
    llamacpp.convert(hf, first, llamacpp.CONVERTER_TYPES.get(quant, "auto"), logs)
    config, _ = parse_json(hf / "config.json")
    for change in llamacpp.align_metadata(first, config or {}, logs):
        log.info(
            "GGUF metadata: %s (what config.json says; llama.cpp's converter reads another key for this architecture)",
            change,
        )
    if first != out:
        log.info("quantizing to %s with llama.cpp", quant)
        llamacpp.quantize(first, out, quant, threads, logs)
        first.unlink()


def _reuse_base(old: object, key: dict, previous: Path, new: Path) -> bool:
    """Link the previous adapter-only export's base GGUF into the new one when it is of the same base and quant."""
    if not (
        isinstance(old, dict)
        and isinstance(old.get("key"), dict)
        and old["key"].get("adapter_only")
        and old["key"].get("base") == key["base"]
        and old["key"].get("gguf_quant") == key["gguf_quant"]
        and previous.is_file()
        and previous.stat().st_size == old.get("size")
    ):
        return False
    try:
        os.link(previous, new)
    except OSError:
        shutil.copyfile(previous, new)
    return True


def _check_memory(cfg: Config, src: Source) -> None:
    """The merge holds the whole model in memory at its own precision (its weights and about a fifth more):
    refused in one line before anything is written where that is more than is available, with the way that
    needs no merge."""
    from app.plan.resources import detect_resources

    config, _ = parse_json(src.base_dir / "config.json")
    half = str((config or {}).get("torch_dtype") or (config or {}).get("dtype")) == "bfloat16"
    weights = (fp32_bytes(src.base_dir) or 0) / (2 if half else 1)

    available = detect_resources(cfg.resources.memory_limit_mb).ram_available_mb * 2**20
    if weights * 1.2 > available:
        raise UserError(
            f"MODEL_NAME={src.base_name}: merging the adapter into it needs about "
            f"{diskspace.human(weights * 1.2)} of memory and {diskspace.human(available)} are available; "
            "GGUF_ADAPTER_ONLY=true converts the base without loading it (llama.cpp reads it lazily) "
            "and the LoRA alone, for llama.cpp's --lora and Ollama's ADAPTER"
        )


def write_merged(cfg: Config, src: Source, out: Path, merge: bool = True) -> None:
    """The model to convert, as a transformers dir with the run's tokenizer: the LoRA adapter merged into its
    base at the base's precision (``merge``), else the base's (or a full run's) own files, linked, not loaded:
    llama.cpp's converter reads them lazily, so converting needs no memory for the model."""
    from app.models.loading import load_tokenizer

    if merge and src.adapter is not None and not is_full_model(src.adapter):
        _merge_into(cfg, src, src.adapter, out)
    else:
        out.mkdir()
        for f in src.base_dir.iterdir():
            if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "chat_template", ".")):
                (out / f.name).symlink_to(f.resolve())
    own_tok = src.adapter is not None and (src.adapter / "tokenizer_config.json").is_file()
    tok_dir = src.adapter if own_tok else src.base_dir
    load_tokenizer(str(tok_dir), cfg.model.trust_remote_code).save_pretrained(out)


def _merge_into(cfg: Config, src: Source, adapter: Path, out: Path) -> None:
    import torch

    from app.models.loading import load_adapter, load_model

    config, _ = parse_json(src.base_dir / "config.json")
    dtype = str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "float32")
    half = dtype == "bfloat16"  # merged at the base's own precision: a bf16 base's weights never go to fp32
    if src.trained_quant != "none":
        log.warning(
            "the adapter was trained on a %s base; merging it into the original unquantized base %s instead "
            "(llama.cpp quantizes on its own), so answers differ slightly from the %s model's",
            src.trained_quant,
            src.base_name,
            src.trained_quant,
        )
    model = load_adapter(load_model(str(src.base_dir), cfg.model.trust_remote_code, bf16=half), adapter)
    model.merge_and_unload().to(getattr(torch, dtype, torch.float32)).save_pretrained(out)


def ensure_gguf(cfg: Config) -> tuple[Path, Source]:
    """INFER_BACKEND=llama.cpp: the run's GGUF at GGUF_QUANT, exported first unless an export of exactly this
    adapter, base and quant is in GGUF_DIR already."""
    llamacpp.require("INFER_BACKEND=llama.cpp")
    quant = cfg.predict.gguf_quant
    src = source_for(cfg)
    info, _ = parse_json(src.out / INFO_FILE)
    key = {**key_for(src, quant), "adapter_only": False}  # the merged model: llama.cpp runs one file
    if isinstance(info, dict) and info.get("key") == key:
        path = src.out / str(info.get("file"))
        size = path.stat().st_size if path.is_file() else None
        if size == info.get("size"):
            log.info("INFER_BACKEND=llama.cpp: %s (%s), exported earlier from this adapter and base", path, quant)
            return path, src
        log.warning(
            "GGUF_DIR=%s: %s is damaged (%s bytes, the export wrote %s): exporting it again",
            src.out,
            path.name,
            size if size is not None else "missing, 0",
            info.get("size"),
        )
    elif isinstance(info, dict):
        log.info(
            "INFER_BACKEND=llama.cpp: the GGUF in %s is of another adapter, base or GGUF_QUANT (%s): "
            "exporting this one in its place",
            src.out,
            (info.get("key") or {}).get("gguf_quant"),
        )
    else:
        log.info(
            "INFER_BACKEND=llama.cpp: exporting %s to GGUF (%s) in %s first; reused while it is unchanged",
            src.adapter or src.base_name,
            quant,
            src.out,
        )
    check(cfg, src, quant)
    export(cfg, src, quant)
    return src.out / f"model-{quant}.gguf", src
