"""What `export-gguf` (and INFER_BACKEND=llama.cpp) turn into a GGUF: the run's ``Source`` (every refusal in one
line), the key an export is reused by while its parts are unchanged, and the disk it needs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from app.config import Config
from app.core.errors import UserError
from app.inference import llamacpp
from app.models.artifacts import base_model_for, find_adapter, is_full_model, is_onnx_dir, parse_json, read_json
from app.models.tiny import resolve_model

# The families of the README's table that llama.cpp's converter supports, by their transformers architecture.
FAMILIES = {
    "GlmForCausalLM": "GLM / GLM-Edge",
    "Glm4ForCausalLM": "GLM-4",
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3",
    "LlamaForCausalLM": "Llama",
    "Gemma3ForCausalLM": "Gemma-3",
}
BYTES_PER_WEIGHT = {
    "f16": 2,
    "bf16": 2,
    "q8_0": 1.07,
    "q6_k": 0.83,
    "q5_k_m": 0.71,
    "q4_k_m": 0.61,
    "q4_k_s": 0.57,
    "q3_k_m": 0.49,
    "q2_k": 0.41,
}  # ggml's block sizes, + the k-quant mixes


@dataclass(frozen=True)
class Source:
    adapter: Path | None  # a LoRA adapter dir, a full model dir, or None (the base itself)
    base_name: str  # MODEL_NAME as trained
    base_dir: Path  # its local dir
    trained_quant: str  # QUANT_LEVEL the adapter was trained on
    out: Path  # GGUF_DIR


def source_for(cfg: Config) -> Source:
    """What `export-gguf` (and INFER_BACKEND=llama.cpp) turn into a GGUF, each refusal in one line."""
    adapter = find_adapter(cfg)
    if adapter is not None and is_onnx_dir(adapter):
        raise UserError(f"ADAPTER_DIR={adapter} is an ONNX export; export the run it came from to GGUF")
    if adapter is not None and not is_full_model(adapter):
        kind = read_json(adapter / "adapter_config.json", f"ADAPTER_DIR={adapter}").get("peft_type", "LORA")
        if kind != "LORA":
            raise UserError(
                f"ADAPTER_DIR={adapter}: a {kind} adapter (METHOD=ptuning) adds learnt prefixes to every "
                "layer's attention at run time, which llama.cpp has no place for; GGUF takes "
                "METHOD=lora, qlora or full runs (predict on this one with INFER_BACKEND=torch)"
            )
    name, quant = base_model_for(cfg, adapter)
    base = Path(resolve_model(name)) if adapter is None or not is_full_model(adapter) else adapter
    if not (base / "config.json").is_file():
        raise UserError(
            f"MODEL_NAME={name}: GGUF export reads a local model dir and there is none; download it "
            f"first (`.venv/bin/hf download {name} --local-dir models/{Path(name).name}`), then "
            f"MODEL_NAME=models/{Path(name).name}"
        )
    arch = ((parse_json(base / "config.json")[0] or {}).get("architectures") or ["?"])[0]
    if arch not in FAMILIES:
        why = (
            "runs its own remote code (TRUST_REMOTE_CODE), whose tokenizer the converter cannot read on current "
            "transformers"
            if arch.startswith("ChatGLM")
            else "is not a family this tool exports"
        )
        raise UserError(
            f"MODEL_NAME={name}: {arch} {why}; GGUF export supports {', '.join(FAMILIES.values())} "
            "(predict on this run with INFER_BACKEND=torch)"
        )
    default = (adapter / "gguf") if adapter is not None else Path("models/gguf") / base.name
    return Source(adapter, name, base, quant, Path(cfg.predict.gguf_dir or default))


def _digest(paths: list[Path], content: bool) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0".encode())
        if content:
            with p.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:  # a base's GBs of weights: by size and modification time, which a change of them changes
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def key_for(src: Source, quant: str) -> dict:
    """What an export is of: reused only while every part is the same (the adapter by its bytes)."""

    def files(d: Path) -> list[Path]:
        return [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]

    adapter = None
    if src.adapter is not None and not is_full_model(src.adapter):
        adapter = _digest(
            [
                p
                for p in files(src.adapter)
                if p.name.startswith(("adapter_", "tokenizer", "special_"))
                or p.name in ("chat_template.jinja", "generation_config.json")
            ],
            content=True,
        )
    return {
        "adapter": adapter,
        "base": _digest(files(src.base_dir), content=False),
        "gguf_quant": quant,
        "llama_cpp": llamacpp.VERSION,
    }


def bytes_needed(base_dir: Path, quant: str) -> int:
    """Peak disk of an export: the merged model at 16 bits, its 16-bit GGUF, and the quantized one."""
    from app.models.artifacts import fp32_bytes

    weights = (fp32_bytes(base_dir) or 0) / 4  # parameters
    return int(weights * (2 + 2 + (BYTES_PER_WEIGHT[quant] if quant not in llamacpp.CONVERTER_TYPES else 0)))
