"""`serve` with INFER_BACKEND=llama.cpp: one base GGUF in llama.cpp, and each LoRA adapter as a llama.cpp LoRA
GGUF applied to it at run time, per batch (llama_set_adapters_lora at scale 1.0 on the one context), as
llama.cpp's own server does with --lora. Memory holds one model however many adapters are served.

The base is the GGUF `make export-gguf ADAPTER_DIR=none` writes (GGUF_QUANT, in GGUF_DIR or
models/gguf/<base>), exported once and reused while the base is unchanged. Each adapter is converted by
llama.cpp's convert_lora_to_gguf.py into <adapter>/gguf-lora/, a folder of the tool's own (marked by
lora_info.json, listed in the run's manifest so `remove-run` takes it), and reused while the adapter's files
and the base are unchanged. The HF tokenizer renders and tokenizes every prompt, as with torch.

On a quantized base the adapter's delta is added to the quantized weights' output, where a merged export adds
it before quantizing: answers agree with the merged GGUF's exactly only at GGUF_QUANT=f16/bf16.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from app.config import Config
from app.core import diskspace, ownership
from app.core.atomic import replace_dir, write_json
from app.core.errors import UserError
from app.inference import llamacpp
from app.inference.gguf_export import ensure_gguf
from app.inference.gguf_source import Source, key_for
from app.serve.adapters import Adapter

log = logging.getLogger(__name__)

LORA_DIR = "gguf-lora"  # in the adapter's dir, beside the gguf/ a merged export writes there
LORA_INFO = "lora_info.json"  # what it was converted from: the marker of a folder this tool may replace
LORA_FILE = "adapter-f16.gguf"


class GgufModels:
    """The base in llama.cpp (``model``, ``tokenizer``) and the adapters' llama.cpp handles by name."""

    def __init__(self, cfg: Config, base_name: str, trained_quant: str):
        from app.inference.gguf_files import GENERATION_FILE
        from app.inference.llamacpp_model import LlamaCppCausalLM
        from app.models.artifacts import parse_json
        from app.models.loading import load_tokenizer

        self.cfg, quant, sv = cfg, cfg.predict.gguf_quant, cfg.serve
        if trained_quant != "none":
            log.info(
                "serve: llama.cpp runs the base at GGUF_QUANT=%s, not at the QUANT_LEVEL=%s the adapters "
                "trained on (INFER_BACKEND=torch serves that)",
                quant,
                trained_quant,
            )
        path, self.src = ensure_gguf(
            cfg.replace({"MODEL_NAME": base_name, "ADAPTER_DIR": "none"}, explicit=["MODEL_NAME"])
        )
        self.tokenizer = load_tokenizer(str(self.src.base_dir), cfg.model.trust_remote_code)
        generation, _ = parse_json(path.parent / GENERATION_FILE)
        # Every request the API accepts must fit its sequence: the longest prompt and answer it lets in.
        seq_ctx = sv.serve_max_prompt_tokens + sv.serve_max_tokens
        self.model = LlamaCppCausalLM(
            path,
            cfg.model.num_threads,
            n_seq=max(1, sv.serve_batch_size),
            seq_ctx=seq_ctx,
            setting="GGUF_DIR",
            generation=generation if isinstance(generation, dict) else None,
            exact=quant in ("f16", "bf16"),
        )
        log.info(
            "serve: llama.cpp on %s (%s): %d sequences (SERVE_BATCH_SIZE) of %d tokens each",
            path,
            quant,
            self.model.n_seq,
            self.model.n_ctx // self.model.n_seq,
        )
        self.loras: dict[str, Any] = {}

    def load(self, adapter: Adapter, lock: AbstractContextManager[object]) -> None:
        """Convert ``adapter`` (or reuse its conversion) and load it beside the base."""
        path = lora_gguf(self.cfg, adapter, self.src)
        with lock:  # the model's list of adapters changes: not while a batch decodes
            self.loras[adapter.name] = self.model.load_lora(path)

    def unload(self, name: str, lock: AbstractContextManager[object]) -> None:
        with lock:
            self.model.free_lora(self.loras.pop(name))

    def use(self, name: str | None) -> None:
        """The next batch runs as adapter ``name``, or as the bare base (None)."""
        self.model.set_lora(self.loras[name] if name is not None else None)


def lora_gguf(cfg: Config, adapter: Adapter, base: Source) -> Path:
    """<adapter>/gguf-lora/adapter-f16.gguf for ``base`` (gguf_export's Source of the served base): converted
    anew unless lora_info.json says it was made from exactly these adapter files and this base."""
    from app.models.artifacts import parse_json, replace_target_problem

    out = adapter.path / LORA_DIR
    src = Source(adapter.path, base.base_name, base.base_dir, "none", out)
    key = {**key_for(src, "f16"), "lora": True}
    info, _ = parse_json(out / LORA_INFO)
    if isinstance(info, dict) and info.get("key") == key:
        size = (out / LORA_FILE).stat().st_size if (out / LORA_FILE).is_file() else None
        if size == info.get("size"):
            log.info(
                "serve: adapter %s as llama.cpp LoRA %s, converted earlier from these files",
                adapter.name,
                out / LORA_FILE,
            )
            return out / LORA_FILE
    problem = replace_target_problem(cfg, out, LORA_INFO, "ADAPTERS")
    if problem:
        raise UserError(problem)
    log.info(
        "serve: converting adapter %s to a llama.cpp LoRA in %s (reused while the adapter is unchanged)",
        adapter.name,
        out,
    )
    handle, name = tempfile.mkstemp(prefix="gguf-lora-", suffix=".log")  # outlives a failed conversion's folder
    os.close(handle)
    try:
        with replace_dir(out, LORA_INFO, "ADAPTERS") as tmp:
            ownership.register(adapter.path, [LORA_DIR])  # in a run: remove-run takes it with the run
            llamacpp.convert_lora(adapter.path, base.base_dir, tmp / LORA_FILE, Path(name))
            write_json(
                tmp / LORA_INFO,
                {
                    "file": LORA_FILE,
                    "key": key,
                    "adapter": str(adapter.path),
                    "base": base.base_name,
                    "size": (tmp / LORA_FILE).stat().st_size,
                },
            )
        Path(name).unlink()
    except OSError as e:
        if diskspace.is_full(e, adapter.path):
            raise UserError(
                diskspace.full_line(
                    "ADAPTERS",
                    out,
                    "converting the adapter for llama.cpp",
                    None,
                    "nothing was written",
                    "start serve again",
                )
            ) from None
        raise UserError(
            f"ADAPTERS: {out} cannot be written ({e.strerror or e}); serve needs it for the adapter's "
            "llama.cpp LoRA: make the adapter's dir writable, or serve with INFER_BACKEND=torch"
        ) from None
    return out / LORA_FILE
