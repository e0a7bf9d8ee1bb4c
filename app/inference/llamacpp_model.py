"""A GGUF model run by llama.cpp (INFER_BACKEND=llama.cpp) behind the part of transformers' model API that
app uses, as app.inference.onnx_model does for ONNX Runtime: Predictor, chat, evaluate and serve run on it
unchanged.

The HF tokenizer still renders and tokenizes every prompt (app.data.encode.prompt_text) and decodes every
answer, and generation stops on the same token ids: llama.cpp only turns token ids into logits. So the
prompt format, the chat template and the stop rules are the torch backend's by construction, whatever the
GGUF's own tokenizer metadata says. Rows of a batch are llama.cpp sequences of one context, decoded
together one token per step (its unified KV cache), as transformers decodes a left-padded batch.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any

from app.core.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch
    from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

_QUIET = None  # the log callback kept alive for the process (llama.cpp holds a pointer to it)
_ERRORS: list[str] = []  # llama.cpp's latest error lines, for the one line a failure gives


def _silence(llama_cpp: ModuleType) -> None:
    """llama.cpp logs line by line to stderr; its errors are kept for the one line that says why a load or a
    decode failed (the rest goes to this logger's debug level)."""
    global _QUIET

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: int | None) -> None:
        line = text.decode("utf-8", "replace").rstrip()
        if level == 4 and line:  # GGML_LOG_LEVEL_ERROR (0 none, 1 debug, 2 info, 3 warn, 5 continued)
            _ERRORS[:] = (_ERRORS + [line])[-8:]
        log.debug("llama.cpp: %s", line)

    _QUIET = quiet
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))


def _why() -> str:
    """The first error llama.cpp gave since the last call, without its function-name prefixes."""
    first = next((e for e in _ERRORS if "failed to load" not in e), _ERRORS[0] if _ERRORS else "no reason given")
    _ERRORS.clear()
    return first.rsplit(": ", 1)[-1] if first.count(": ") > 1 else first


class LlamaCppCausalLM:
    """``generate`` (greedy or sampled, batched, stop tokens, a streamer), ``model(input_ids).logits`` (the
    last position's), ``.device``, ``.eval()``; ``step_logits`` for serve's own decoding loop."""

    training = False

    def __init__(
        self,
        path: str | Path,
        num_threads: int = 0,
        n_seq: int = 8,
        seq_ctx: int = 2048,
        setting: str = "GGUF_DIR",
        generation: dict | None = None,
        exact: bool = False,
    ):
        """``n_seq`` sequences (a batch's rows) of up to ``seq_ctx`` tokens each (at most the model's own
        context), in one unified KV cache. ``exact`` (a 16-bit GGUF, chosen for being exact): the KV cache in
        f32 and attention without flash attention, whose f16 cache and sums move logits by ~1e-3 (llama.cpp's
        defaults, kept for the quantized types, whose own rounding is larger)."""
        import llama_cpp
        import torch

        from app.core.utils import usable_cpus

        self.lib, self.path = llama_cpp, Path(path)
        _silence(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        _ERRORS.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise UserError(
                f"{setting}={self.path.parent}: {self.path.name} does not load in llama.cpp ({_why()}): "
                "damaged, or written by another version; `make export-gguf` writes it anew"
            )
        threads = num_threads or usable_cpus()
        seq_ctx = min(seq_ctx, llama_cpp.llama_model_n_ctx_train(self.model) or seq_ctx)
        n_ctx = n_seq * seq_ctx
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, min(512, n_ctx), min(512, n_ctx)
        cparams.n_seq_max, cparams.kv_unified = n_seq, True
        cparams.n_threads = cparams.n_threads_batch = threads
        if exact:
            cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise UserError(
                f"llama.cpp could not make a context of {n_ctx} tokens for {self.path} (memory?); "
                "lower MAX_NEW_TOKENS or PREDICT_BATCH_SIZE"
            )
        self.n_ctx, self.n_seq, self.n_batch = n_ctx, n_seq, min(512, n_ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq)
        gen = generation or {}  # the run's generation_config.json: where generation stops, how it samples
        eos = gen.get("eos_token_id")
        self.eos_token_id: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.top_k, self.top_p = gen.get("top_k"), gen.get("top_p")
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(model_type="gguf", gguf=True, max_position_embeddings=seq_ctx)
        self.generation_config = SimpleNamespace(eos_token_id=self.eos_token_id)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            if self.lib.llama_batch_free is None:  # interpreter shutdown: the process frees it all
                return
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

    def eval(self) -> LlamaCppCausalLM:
        return self

    def train(self, mode: bool = True) -> LlamaCppCausalLM:
        return self

    # ---- llama.cpp steps ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def forget(self, seq: int) -> None:
        """Clear sequence ``seq`` alone (serve: a finished row's, before another row takes it)."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq, -1, -1)

    # ---- LoRA adapters on this model (serve: applied per batch, as llama-server's --lora) ------------------
    def load_lora(self, path: str | Path, setting: str = "ADAPTERS") -> Any:
        """A llama.cpp LoRA GGUF of this model's base; freed with the model, or by ``free_lora``."""
        adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise UserError(
                f"{setting}: {path} does not load in llama.cpp as a LoRA of {self.path.name} (damaged, "
                "or of another base); delete it and it is converted again"
            )
        return adapter

    def set_lora(self, adapter: Any | None) -> None:
        """Every decode from now on runs with ``adapter`` at scale 1.0, or with none (the bare base)."""
        if adapter is None:
            self.lib.llama_set_adapters_lora(self.ctx, None, 0, None)
            return
        one = (self.lib.llama_adapter_lora_p_ctypes * 1)(adapter)
        self.lib.llama_set_adapters_lora(self.ctx, one, 1, (ctypes.c_float * 1)(1.0))

    def free_lora(self, adapter: Any) -> None:
        self.set_lora(None)  # the context must not hold on to a freed adapter
        self.lib.llama_adapter_lora_free(adapter)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode of (token, position, sequence, wants logits) items -> their logits rows."""
        import numpy as np

        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code}): {_why()}")
        rows = [i for i, item in enumerate(items) if item[3]]
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for r, i in enumerate(rows):
            ptr = self.lib.llama_get_logits_ith(self.ctx, i)
            out[r] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def prefill(self, tokens: list[int], seq: int = 0, start: int = 0) -> np.ndarray:
        """Evaluate ``tokens`` at positions start.. in sequence ``seq``; the last one's logits."""
        last = None
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            final = i + len(chunk) == len(tokens)
            out = self._decode([(t, start + i + k, seq, final and k == len(chunk) - 1) for k, t in enumerate(chunk)])
            last = out[0] if final else last
        if last is None:
            raise ValueError("prefill needs at least one token")
        return last

    def step_logits(self, tokens: list[int], positions: list[int], seqs: list[int]) -> np.ndarray:
        """One token for each of several sequences, decoded together -> their next-token logits."""
        return self._decode([(t, p, s, True) for t, p, s in zip(tokens, positions, seqs, strict=True)])

    # ---- transformers' API ---------------------------------------------------------------------------
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> SimpleNamespace:
        """Every position's logits (evaluate's teacher-forced answer loss reads them all): each row's real
        tokens (mask 1) decoded as one sequence, its padding's logits left 0."""
        import numpy as np
        import torch

        ids = input_ids.cpu().tolist()
        mask = attention_mask.cpu().tolist() if attention_mask is not None else [[1] * len(r) for r in ids]
        out = np.zeros((len(ids), len(ids[0]), self.n_vocab), np.float32)
        for r, (row, keep) in enumerate(zip(ids, mask, strict=True)):
            where = [i for i, m in enumerate(keep) if m]
            self.reset()
            for start in range(0, len(where), self.n_batch):
                part = where[start : start + self.n_batch]
                out[r, part] = self._decode([(row[i], start + k, 0, True) for k, i in enumerate(part)])
        return SimpleNamespace(logits=torch.from_numpy(out))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        streamer: BaseStreamer | None = None,
        use_cache: bool = True,
        **_: Any,
    ) -> torch.Tensor:
        """Like transformers' generate: prompt + new tokens; finished rows are padded with pad_token_id."""
        import numpy as np
        import torch

        from app.inference.onnx_model import pick_token

        eos = (
            self.eos_token_id
            if eos_token_id is None
            else [eos_token_id]
            if isinstance(eos_token_id, int)
            else list(eos_token_id)
        )
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        rows = _unpadded(input_ids, attention_mask)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new: list[np.ndarray] = []

        def pick(logits: np.ndarray) -> np.ndarray:
            return pick_token(logits, do_sample, temperature, self.top_k, self.top_p)

        for start in range(0, len(rows), self.n_seq):  # a batch larger than the context's sequences: in turns
            new_part = self._generate_rows(rows[start : start + self.n_seq], max_new_tokens, pad, eos, streamer, pick)
            new.append(new_part)
        width = max(part.shape[1] for part in new)
        new_ids = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=pad) for p in new])
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids.cpu(), torch.from_numpy(new_ids).long()], dim=1)

    def _generate_rows(
        self,
        rows: list[list[int]],
        max_new: int,
        pad: int,
        eos: list[int],
        streamer: BaseStreamer | None,
        pick: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        import numpy as np
        import torch

        self.reset()
        if sum(len(r) for r in rows) + len(rows) * max_new > self.n_ctx:
            raise UserError(
                f"{len(rows)} prompts of up to {max(len(r) for r in rows)} tokens and MAX_NEW_TOKENS="
                f"{max_new} exceed llama.cpp's context of {self.n_ctx} tokens; lower PREDICT_BATCH_SIZE"
            )
        logits = np.stack([self.prefill(row, seq) for seq, row in enumerate(rows)])
        running = np.ones(len(rows), bool)
        out: list[np.ndarray] = []
        for step in range(max_new):
            nxt = np.where(running, pick(logits), pad)
            out.append(nxt)
            if streamer is not None:
                streamer.put(torch.from_numpy(nxt))
            running &= ~np.isin(nxt, eos)
            if not running.any() or step == max_new - 1:
                break
            live = np.flatnonzero(running)
            rows_logits = self.step_logits(
                [int(nxt[i]) for i in live], [len(rows[i]) + step for i in live], [int(i) for i in live]
            )
            logits[live] = rows_logits
        return np.stack(out, axis=1) if out else np.zeros((len(rows), 0), np.int64)


def _unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens (left padding, where the mask is 0, dropped)."""
    ids = input_ids.cpu().tolist()
    if attention_mask is None:
        return ids
    masks = attention_mask.cpu().tolist()
    return [[t for t, m in zip(row, mask, strict=True) if m] for row, mask in zip(ids, masks, strict=True)]
