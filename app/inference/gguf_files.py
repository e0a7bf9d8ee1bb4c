"""What goes beside an exported GGUF: the run's generation_config.json (the stop tokens INFER_BACKEND=llama.cpp
generates with, as torch does), an Ollama Modelfile whose TEMPLATE and stop tokens are the training format
(app.inference.modelfile) and a README with the llama.cpp and Ollama commands."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

GENERATION_FILE = "generation_config.json"


def runtime_bos(gguf_file: Path, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text of the BOS token llama.cpp and Ollama put before every prompt of ``gguf_file``, or None when
    its metadata says they add none (the Modelfile's TEMPLATE then keeps the template's own)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    add, bos = reader.get_field("tokenizer.ggml.add_bos_token"), reader.get_field("tokenizer.ggml.bos_token_id")
    if add is None or not add.contents() or bos is None:
        return None
    return cast(str, tokenizer.convert_ids_to_tokens(int(bos.contents())))  # one id: one token


def write_companions(
    folder: Path, gguf_name: str, model_dir: Path, label: str, quant: str, adapter_gguf: str | None = None
) -> None:
    """Into the export being written: generation_config.json, Modelfile and README.md for ``gguf_name`` (the
    model, or with ``adapter_gguf`` the base it applies to), from ``model_dir`` (the merged model or the base
    with the run's tokenizer)."""
    from app.core.atomic import atomic_write_text
    from app.inference.modelfile import modelfile_text, readme_text, stop_tokens
    from app.models.loading import load_tokenizer

    if (model_dir / GENERATION_FILE).is_file():
        shutil.copyfile(model_dir / GENERATION_FILE, folder / GENERATION_FILE)
    tokenizer = load_tokenizer(str(model_dir))
    bos = runtime_bos(folder / gguf_name, tokenizer)
    text = modelfile_text(gguf_name, tokenizer, stop_tokens(tokenizer, model_dir), None, {}, runtime_bos=bos)
    if adapter_gguf:  # Ollama applies a llama.cpp LoRA GGUF given as ADAPTER, on the FROM model
        text = text.replace(f"FROM ./{gguf_name}\n", f"FROM ./{gguf_name}\nADAPTER ./{adapter_gguf}\n", 1)
    atomic_write_text(folder / "Modelfile", text)
    atomic_write_text(
        folder / "README.md",
        readme_text(gguf_name, label, quant, adapter_gguf=adapter_gguf, base_gguf=gguf_name if adapter_gguf else None),
    )
