"""What `serve` holds: one base model, loaded once as `predict` loads it, and LoRA adapters on it by name.

The base is MODEL_NAME when set, else the base the first adapter was trained on (its train_config.json,
QUANT_LEVEL included, as `predict` picks it). An adapter trained on another base is skipped with a line
saying so: its answers would be wrong on this one. P-Tuning prefixes cannot share a PEFT model with LoRA
adapters, so they are refused with a line naming `predict-custom` instead.

INFER_BACKEND=llama.cpp serves the same names from one base GGUF with each adapter applied per batch
(app/serve/gguf.py); the requests, batching, stop rules and sampling are the same engine's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Config
from app.core.errors import UserError
from app.serve.adapters import Adapter, discover

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from app.inference.llamacpp_model import LlamaCppCausalLM
    from app.serve.gguf import GgufModels

log = logging.getLogger(__name__)

MODELS_DIR = Path("models")  # where adapters may be loaded from (ADAPTERS and load_lora_adapter)


class ServedModels:
    model: PreTrainedModel | PeftModel | LlamaCppCausalLM
    tokenizer: PreTrainedTokenizerBase

    def __init__(self, cfg: Config, root: Path = MODELS_DIR):
        from app.inference.predict import load_base
        from app.models.artifacts import base_model_for
        from app.models.loading import load_tokenizer
        from app.models.tiny import resolve_model

        if cfg.model.trust_remote_code:  # its decoding loop drives transformers' own model classes
            raise UserError(
                "serve: TRUST_REMOTE_CODE models (ChatGLM-6B/2/3's own code) cannot be served yet; "
                "serve a model transformers supports natively (GLM-4, glm-edge, Qwen, Llama), or "
                "answer with `make predict-custom`"
            )
        self.root, self.created = root, int(time.time())
        found = discover(cfg.serve.adapters, root)
        self.base_name, quant = base_model_for(cfg, found[0].path if found else None)
        self.gguf: GgufModels | None = None  # INFER_BACKEND=llama.cpp
        if cfg.predict.infer_backend == "llama.cpp":
            from app.serve.gguf import GgufModels

            self.gguf = GgufModels(cfg, self.base_name, quant)
            self.model, self.tokenizer = self.gguf.model, self.gguf.tokenizer
        else:
            base = resolve_model(self.base_name)
            self.model = load_base(base, quant, cfg.model.trust_remote_code).eval()
            self.tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
        self.adapters: dict[str, Adapter] = {}
        self.tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self.lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()  # the engine's, once it runs
        self.trust_remote_code = cfg.model.trust_remote_code
        log.info(
            "serve: base %s%s%s",
            self.base_name,
            "" if quant == "none" or self.gguf else f" ({quant})",
            "" if self.gguf else f" on {placement(self.model)}",
        )
        for adapter in found:
            try:
                self.load(adapter)
            except UserError as e:
                log.warning("serve: not serving %s: %s", adapter.path, e)

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def load(self, adapter: Adapter) -> None:
        """Add ``adapter`` under its name (UserError, one line, when it cannot be served on this base)."""
        from app.models.loading import load_adapter, load_tokenizer

        if adapter.name in self.adapters or adapter.name == self.base_name:
            raise UserError(f"an adapter named {adapter.name!r} is already served; unload it first")
        if adapter.method == "ptuning":
            raise UserError(
                f"{adapter.path} is a P-Tuning prefix, which cannot share the base with LoRA adapters; "
                f"answer with it through `make predict-custom ADAPTER_DIR={adapter.path}`"
            )
        if adapter.base and adapter.base != self.base_name:
            raise UserError(
                f"{adapter.path} was trained on {adapter.base}, not on the served base {self.base_name}; "
                f"serve it from its own base (MODEL_NAME={adapter.base})"
            )
        own = (adapter.path / "tokenizer_config.json").is_file()  # the template it was trained with, as predict uses
        tokenizer = load_tokenizer(str(adapter.path), self.trust_remote_code, setting="ADAPTERS") if own else None
        if self.gguf is not None:
            self.gguf.load(adapter, self.lock)
        else:
            with self.lock:
                self.model = load_adapter(self.torch_model(), adapter.path, adapter.name).eval()
        self.adapters[adapter.name] = adapter
        self.tokenizers[adapter.name] = tokenizer or self.tokenizer
        log.info("serve: adapter %s from %s", adapter.name, adapter.path)

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(name)
        if self.gguf is not None:
            self.gguf.unload(name, self.lock)
        else:
            with self.lock:
                self.torch_model().delete_adapter(name)
        del self.adapters[name], self.tokenizers[name]
        log.info("serve: adapter %s unloaded", name)

    def torch_model(self) -> PreTrainedModel | PeftModel:
        """The transformers model, under INFER_BACKEND=torch (llama.cpp's adapters go through ``self.gguf``)."""
        from app.inference.llamacpp_model import LlamaCppCausalLM

        if isinstance(self.model, LlamaCppCausalLM):
            raise TypeError("INFER_BACKEND=llama.cpp serves no transformers model")
        return self.model

    def tokenizer_for(self, name: str | None) -> PreTrainedTokenizerBase:
        return self.tokenizers[name] if name is not None else self.tokenizer

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the model as adapter ``name``, or as the bare base (None); called under the engine's lock."""
        if self.gguf is not None:
            self.gguf.use(name)
            yield
            return
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def listing(self) -> list[dict[str, Any]]:
        """GET /v1/models' data: the base, then each adapter with ``parent`` = the base (vLLM's convention)."""
        card = {"object": "model", "created": self.created, "owned_by": "chatglm-cpu-trainer"}
        return [{"id": self.base_name, **card, "root": self.base_name, "parent": None}] + [
            {"id": a.name, **card, "root": str(a.path), "parent": self.base_name} for a in self.adapters.values()
        ]


def placement(model: Any) -> str:
    """Where a torch model's weights live and in what dtype, as the serve log states it: 'cuda:0, bfloat16'."""
    first = next(model.parameters())
    return f"{first.device}, {str(first.dtype).removeprefix('torch.')}"
