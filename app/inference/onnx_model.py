"""An ONNX export (app.inference.export) run by ONNX Runtime behind the part of transformers' model API
that app uses, so Predictor and evaluation run on it unchanged.

``generate`` is the few lines of generation optimum's ORTModelForCausalLM would provide (greedy or
sampled, batched with left padding, stop tokens, a streamer); the graph's inputs and outputs are
described in app.inference.export. Loading is checked like any model dir: a damaged export is one
line (app.models.integrity.load_failure), not an ONNX Runtime traceback.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from app.models.artifacts import META_FILE, ONNX_FILE, read_json
from app.models.integrity import load_failure

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers.generation.streamers import BaseStreamer


class OnnxCausalLM:
    """An exported model in ONNX Runtime, with the part of transformers' model API that app uses:
    ``generate`` (greedy or sampled, batched with left padding, stop tokens, a streamer),
    ``model(input_ids).logits``, ``.device``, ``.eval()``. Predict and evaluate run on it unchanged."""

    training = False

    def __init__(self, path: str | Path, num_threads: int = 0, setting: str = "ADAPTER_DIR"):
        import onnxruntime
        import torch

        from app.core.utils import usable_cpus

        self.path = Path(path)
        label = f"{setting}={self.path}"  # ``setting``: what the user set to name this export, for errors
        self.meta = read_json(self.path / META_FILE, label)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = num_threads or usable_cpus()
        opts.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path / ONNX_FILE), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT's own error types; a damaged file is the usual cause
            raise (load_failure(self.path, label, e, any_error=True) or e) from e
        self.past_names = [n for n in self.meta["inputs"] if n.startswith("past_key_values.")]
        gen_file = self.path / "generation_config.json"
        gen = read_json(gen_file, label) if gen_file.is_file() else {}
        eos = gen.get("eos_token_id")
        self.eos_token_id: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.pad_token_id: int | None = gen.get("pad_token_id")
        self.top_k, self.top_p = gen.get("top_k"), gen.get("top_p")
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(model_type=self.meta["architecture"], onnx=True)

    def eval(self) -> OnnxCausalLM:
        return self

    def train(self, mode: bool = True) -> OnnxCausalLM:
        return self

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        past: list[np.ndarray] | None = None,
        keep_all: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph run on numpy int64 arrays -> (logits, presents). ``past=None``: a fresh prompt."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        if past is None:
            past = [np.zeros([b, h, 0, d], np.float32) for h, d in self.meta["past_shape"] for _ in range(2)]
        total = s + past[0].shape[2]
        mask = np.ones((b, total), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if position_ids is None:
            position_ids = np.where(mask == 0, 1, mask.cumsum(-1) - 1)[:, -s:]
        feed = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": np.asarray(position_ids, np.int64),
            "logits_to_keep": np.arange(s, dtype=np.int64) if keep_all else np.array([s - 1], np.int64),
            **dict(zip(self.past_names, past, strict=True)),
        }
        logits, *presents = self.session.run(None, feed)
        return logits, presents

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> SimpleNamespace:
        import torch

        mask = None if attention_mask is None else attention_mask.cpu().numpy()
        logits, _presents = self.forward(input_ids.cpu().numpy(), mask, keep_all=True)
        return SimpleNamespace(logits=torch.from_numpy(logits))

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
    ) -> torch.Tensor:
        """Like transformers' generate: prompt + new tokens; finished rows are padded with pad_token_id."""
        import numpy as np
        import torch

        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        eos = (
            self.eos_token_id
            if eos_token_id is None
            else [eos_token_id]
            if isinstance(eos_token_id, int)
            else list(eos_token_id)
        )
        pad = (
            pad_token_id
            if pad_token_id is not None
            else self.pad_token_id
            if self.pad_token_id is not None
            else (eos[0] if eos else 0)
        )
        if streamer is not None:
            streamer.put(input_ids.cpu())
        position_ids = np.where(mask == 0, 1, mask.cumsum(-1) - 1)
        running = np.ones(len(ids), bool)
        new: list[np.ndarray] = []
        step_ids, past = ids, None
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_ids, mask, position_ids, past)
            nxt = self._pick(logits[:, -1], do_sample, temperature)
            nxt = np.where(running, nxt, pad)
            new.append(nxt)
            if streamer is not None:
                streamer.put(torch.from_numpy(nxt))
            running &= ~np.isin(nxt, eos)
            if not running.any():
                break
            step_ids = nxt[:, None]
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
            position_ids = position_ids[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        return torch.from_numpy(np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids)

    def _pick(self, logits: np.ndarray, do_sample: bool, temperature: float) -> np.ndarray:
        return pick_token(logits, do_sample, temperature, self.top_k, self.top_p)


def pick_token(
    logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """Next token ids from last-position logits (numpy): argmax, or transformers' temperature/top-k/top-p
    sampling (the model's generation_config values, as transformers' generate applies them)."""
    import torch

    if not do_sample:
        return logits.argmax(-1)
    scores = torch.from_numpy(logits).float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1)[:, 0].numpy()
