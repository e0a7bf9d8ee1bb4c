"""llama.cpp, pinned, for `make export-gguf` and INFER_BACKEND=llama.cpp: where its toolchain lives, and the
two steps of its own an export runs, each in a child process (their logs and any crash stay there):
convert_hf_to_gguf.py (a merged model -> a 16-bit GGUF), then its quantizer through the Python binding.

Nothing here converts tensors itself: llama.cpp's converter and quantizer do, at the version
requirements-gguf.txt pins. `make setup-gguf` builds the binding from source and extracts the converter
scripts of the same version into <venv>/share/llama.cpp (they are not in the binding's wheel).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from app.core.errors import UserError

log = logging.getLogger(__name__)

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the converter's and the runtime's version
SETUP = f"run `make setup-gguf` (builds llama-cpp-python {VERSION} from source once: cmake and a C++ compiler)"

# GGUF_QUANT -> llama.cpp's file type: the float ones are written by the converter, the rest by its quantizer.
CONVERTER_TYPES = {"f16": "f16", "bf16": "bf16"}
QUANTIZER_TYPES = {
    name: f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    for name in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k")
}


def converter_dir() -> Path:
    """Where `make setup-gguf` put llama.cpp's converter scripts (the venv's share/, as a package's data)."""
    return Path(sys.prefix) / "share" / "llama.cpp"


def missing(what: str) -> str | None:
    """Why llama.cpp cannot be used for ``what`` (a setting or command, for the line), or None. Reads only
    the installed packages' metadata: the pre-flight calls it before anything heavy is imported."""
    from importlib import metadata, util

    if util.find_spec("llama_cpp") is None:
        return f"{what} needs llama.cpp's Python binding, which is not installed: {SETUP}"
    try:
        have = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        have = "?"
    if have != VERSION:
        return f"{what}: llama-cpp-python {have} is installed, this tool is tested with {VERSION}: {SETUP}"
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return f"{what} needs llama.cpp's converter scripts in {converter_dir()}, which are missing: {SETUP}"
    return None


def require(what: str) -> None:
    problem = missing(what)
    if problem:
        raise UserError(problem)


def _child(args: list[str], log_file: Path, what: str) -> None:
    """Run ``python -m app.inference.gguf_convert args`` with its output in ``log_file``; one line if it fails."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p
            for p in (str(converter_dir()), str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH"))
            if p
        ),
    }
    with log_file.open("ab") as out:
        code = subprocess.call(
            [sys.executable, "-m", "app.inference.gguf_convert", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    if code != 0:
        raise ConversionFailed(f"{what} failed (exit {code}): {last_error(log_file)}; the whole log: {log_file}")


class ConversionFailed(UserError):
    """llama.cpp's converter or quantizer failed: its last words and where its log is."""


def last_error(log_file: Path) -> str:
    """The line of a converter log that says what went wrong (the exception's own line, else the last)."""
    try:
        lines = [ln.strip() for ln in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("error")]
    return (errors or lines or ["(no output)"])[-1][:400]


def convert(hf_dir: Path, out: Path, outtype: str, log_file: Path, vocab_only: bool = False) -> None:
    """llama.cpp's convert_hf_to_gguf.py: ``hf_dir`` (a merged model, or a base) -> ``out`` at ``outtype``
    (f16, bf16, or auto: the model's own 16-bit type); ``vocab_only``: the tokenizer alone."""
    _child(
        ["convert", str(hf_dir), "--outfile", str(out), "--outtype", outtype, *(["--vocab-only"] * vocab_only)],
        log_file,
        "llama.cpp's converter",
    )


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, log_file: Path) -> None:
    """llama.cpp's convert_lora_to_gguf.py: a PEFT LoRA adapter -> a GGUF adapter for ``--lora``."""
    _child(
        ["convert-lora", str(adapter_dir), "--base", str(base_dir), "--outfile", str(out), "--outtype", "f16"],
        log_file,
        "llama.cpp's LoRA converter",
    )


def quantize(src: Path, dst: Path, quant: str, threads: int, log_file: Path) -> None:
    """llama.cpp's quantizer (llama_model_quantize, through the binding): ``src`` GGUF -> ``dst`` at ``quant``."""
    _child(
        ["quantize", str(src), str(dst), QUANTIZER_TYPES[quant], str(threads)],
        log_file,
        f"llama.cpp's quantizer ({quant})",
    )


# GGUF keys (after "<arch>.") that llama.cpp's converter fills from the model's config.json, and the config's
# names for them. For some architectures it reads another name and falls back to a default: for
# GlmForCausalLM (GLM-Edge, GLM-4-hf) it writes layer_norm_rms_epsilon 1e-5 whatever rms_norm_eps says, and
# hidden_size as the context length unless the config has seq_length.
CONFIG_KEYS = {
    "context_length": ("max_position_embeddings", "seq_length"),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps", "layernorm_epsilon"),
}


def align_metadata(gguf_file: Path, config: dict, log_file: Path) -> list[str]:
    """Set the CONFIG_KEYS a conversion got wrong to the config's values, in place, with llama.cpp's own
    gguf_set_metadata.py (a scalar, same type: the file's size and tensors stay); what changed, for the log."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise UserError(f"{gguf_file}: the conversion wrote no general.architecture (not a model GGUF); see {log_file}")
    arch = arch_field.contents()
    changes = []
    for suffix, names in CONFIG_KEYS.items():
        field = reader.get_field(f"{arch}.{suffix}")
        want = next((config[n] for n in names if isinstance(config.get(n), (int, float))), None)
        if (
            field is not None
            and want is not None
            and not math.isclose(float(field.contents()), float(want), rel_tol=1e-6)
        ):
            changes.append((f"{arch}.{suffix}", field.contents(), want))
    del reader  # its memory map, before the file is written
    for key, _have, want in changes:
        _child(
            ["set-metadata", str(gguf_file), key, repr(want), "--force"], log_file, "llama.cpp's gguf_set_metadata.py"
        )
    return [f"{key} {have:g} -> {want:g}" for key, have, want in changes]
