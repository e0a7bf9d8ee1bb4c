"""The running batch of `serve`'s engine (app/serve/engine.py): rows join it between decode steps, and leave it
when they finish.

``TorchBatch`` (transformers): one KV cache (a DynamicCache) for every row, an attention mask and each row's count
of real tokens. Rows that join are prefilled apart (left-padded, their own forward and cache), then merged: the
shorter of the two caches and masks is left-padded with masked columns to the other's length, and the two are
concatenated on the batch dimension. A row's position ids count its own tokens only, so padding never moves its
rotary positions: each row's answer is the one it gets alone. A finished row leaves (its cache row is dropped), and
the columns that are padding in every row left are trimmed, so the cache is as long as the longest running row.
Padding a cache on the left is right only for full-attention layers: ``joinable`` says whether a model's are all
such (sliding-window layers, as Gemma 3's, are not); where not, the engine admits no rows into a running batch.

``SequenceBatch`` (INFER_BACKEND=llama.cpp): each row is its own sequence of the one llama.cpp context, prefilled
alone (no padding) into a free sequence; one llama_decode per step feeds every running row its last token at its
own next position, and a finished row's sequence is cleared for the next row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

    from app.inference.llamacpp_model import LlamaCppCausalLM

log = logging.getLogger(__name__)


def joinable(model: PreTrainedModel | PeftModel) -> bool:
    """Whether ``model``'s KV cache is full-attention layers only, whose rows can be padded and merged."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


class FilledLayer(Protocol):
    """A full-attention cache layer (transformers' DynamicLayer) that a prefill has filled."""

    keys: torch.Tensor  # (rows, heads, cache length, head dim)
    values: torch.Tensor


@dataclass
class Running:
    """A TorchBatch's state while it has rows."""

    cache: DynamicCache
    mask: torch.Tensor  # (rows, cache length): 1 where a row has a real token
    logits: torch.Tensor  # (rows, vocab): each row's next-token logits

    def layers(self) -> list[FilledLayer]:
        """The cache's layers: filled by the prefill, and full-attention ones (``joinable``) wherever rows are
        merged or trimmed."""
        return cast("list[FilledLayer]", self.cache.layers)


class TorchBatch:
    """The running rows on a transformers model; ``rows``, ``admit`` and ``step`` are all the engine uses."""

    def __init__(self, model: PreTrainedModel | PeftModel, pad: int, eos: set[int], trim: bool):
        import inspect

        self.model, self.pad, self.eos, self.trim = model, pad, eos, trim
        # a PeftModel passes it on (through Module.__getattr__: untyped)
        base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
        # the last position's logits only, as generate() asks: a prompt's every row of vocabulary logits is
        # a quarter of its prefill
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        self.rows: list[Row] = []
        self.running: Running | None = None  # None: no rows

    def admit(self, rows: list[Row]) -> None:
        """Prefill ``rows``' prompts together, then merge them into the running batch."""
        import torch
        from transformers import DynamicCache

        longest = max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):  # left-padded: every row's next token is at the same column
            ids[i, longest - len(row.job.prompt_ids) :] = torch.tensor(row.job.prompt_ids)
            mask[i, longest - len(row.job.prompt_ids) :] = 1
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        new = Running(cache, mask, logits)
        if self.running is not None:
            new = _merge(self.running, new)
        self.rows, self.running = self.rows + rows, new

    def step(self) -> None:
        """Each row picks its next token; finished rows leave; the others decode it (one forward for them all)."""
        import torch

        if self.running is None:
            return
        logits = self.running.logits
        tokens = [row.step(logits[i], self.eos) for i, row in enumerate(self.rows)]
        live = [i for i, row in enumerate(self.rows) if not row.done]
        if len(live) < len(self.rows):
            self._keep(live)
        run = self.running
        if run is None:
            return
        position = run.mask.sum(-1, keepdim=True)  # each row's own count of tokens: its next one's position
        run.mask = torch.cat([run.mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
        ids = torch.tensor([tokens[i] for i in live], dtype=torch.long)[:, None]
        run.logits = self._forward(ids, run.mask, position, run.cache)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        import torch

        device = self.model.device
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position.to(device),
                past_key_values=cache,
                use_cache=True,
                **self.last_only,
            )
        return out.logits[:, -1, :].float().cpu()

    def _keep(self, live: list[int]) -> None:
        """Only rows ``live`` stay; then the left columns no row uses go (only where ``trim``: full attention)."""
        import torch

        self.rows = [self.rows[i] for i in live]
        run = self.running
        if not self.rows or run is None:
            self.running = None
            return
        index = torch.tensor(live)
        run.cache.batch_select_indices(index.to(self.model.device))
        run.mask = run.mask[index]  # (the logits: step's next forward replaces them for the rows left)
        start = int(run.mask.any(0).int().argmax())  # rows are left-padded: the unused columns are a prefix
        if self.trim and start > 0:
            run.mask = run.mask[:, start:]
            for layer in run.layers():
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


def _merge(run: Running, other: Running) -> Running:
    """``run`` with ``other``'s rows below its own, both left-padded (masked) to the longer one's length."""
    import torch
    import torch.nn.functional as F

    width = max(run.mask.shape[1], other.mask.shape[1])

    def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:  # pads the sequence axis (-2 of keys, -1 of a mask)
        return F.pad(t, (0, 0) * (dim_from_end - 1) + (width - t.shape[-dim_from_end], 0))

    for layer, extra in zip(run.layers(), other.layers(), strict=True):
        layer.keys = torch.cat([left(layer.keys, 2), left(extra.keys, 2)])
        layer.values = torch.cat([left(layer.values, 2), left(extra.values, 2)])
    return Running(
        run.cache, torch.cat([left(run.mask, 1), left(other.mask, 1)]), torch.cat([run.logits, other.logits])
    )


class SequenceBatch:
    """The running rows on llama.cpp (app/inference/llamacpp_model.py), each in a sequence of its own."""

    def __init__(self, model: LlamaCppCausalLM, eos: set[int], slots: int):
        self.model, self.eos, self.slots = model, eos, slots
        self.rows: list[Row] = []
        self.seqs: list[int] = []
        self.positions: list[int] = []
        self.logits: list[torch.Tensor] = []
        model.reset()

    def admit(self, rows: list[Row]) -> None:
        import torch

        for row in rows:
            seq = min(set(range(self.slots)) - set(self.seqs))
            self.logits.append(torch.from_numpy(self.model.prefill(row.job.prompt_ids, seq)))
            self.rows.append(row)
            self.seqs.append(seq)
            self.positions.append(len(row.job.prompt_ids))

    def step(self) -> None:
        import torch

        tokens = [row.step(self.logits[i], self.eos) for i, row in enumerate(self.rows)]
        live = [i for i, row in enumerate(self.rows) if not row.done]
        for i in sorted(set(range(len(self.rows))) - set(live)):  # cleared for the next row that takes it
            self.model.forget(self.seqs[i])
        self.rows = [self.rows[i] for i in live]
        self.seqs = [self.seqs[i] for i in live]
        tokens, self.positions = [tokens[i] for i in live], [self.positions[i] for i in live]
        if not self.rows:
            return
        out = self.model.step_logits(tokens, self.positions, self.seqs)
        self.logits = [torch.from_numpy(row) for row in out]
        self.positions = [p + 1 for p in self.positions]


class Row:
    """One request's generation: sampling, stop strings, and text sent so far (whole characters only)."""

    def __init__(self, job: Any, tokenizer: PreTrainedTokenizerBase):
        import torch

        self.job, self.tokenizer, self.sent, self.done = job, tokenizer, 0, False
        self.tokens: list[int] = []
        self.generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming

    def step(self, logits: torch.Tensor, eos: set[int]) -> int:
        """Pick the next token, send the text it completes; finish on EOS, a stop string, max_tokens or cancel."""
        if self.job.cancelled.is_set():
            return self._finish("cancelled")
        token = self._pick(logits)
        self.tokens.append(token)
        if token in eos:
            return self._finish("stop", token)
        text = cast(str, self.tokenizer.decode(self.tokens, skip_special_tokens=True))  # one sequence: one text
        cut = min((text.find(s) for s in self.job.stop if s and s in text), default=-1)
        if cut >= 0:
            return self._finish("stop", token, text[:cut])
        if len(self.tokens) >= self.job.max_tokens:
            return self._finish("length", token, text)
        ready = len(text) - self.hold
        while ready > self.sent and text[ready - 1] == "\ufffd":  # half a character: wait for the rest
            ready -= 1
        if ready > self.sent:
            self.job.emit(("delta", text[self.sent : ready]))
            self.sent = ready
        return token

    def _pick(self, logits: torch.Tensor) -> int:
        import torch

        t, p = self.job.temperature, self.job.top_p
        if t <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / t, dim=-1)
        if p < 1:  # nucleus: the smallest set of tokens whose probability reaches top_p
            ordered, index = probs.sort(descending=True)
            keep = ordered.cumsum(-1) - ordered < p
            probs = torch.zeros_like(probs).scatter(0, index[keep], ordered[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))

    def _finish(self, reason: str, token: int | None = None, text: str | None = None) -> int:
        if text is None and reason != "cancelled":
            text = cast(str, self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if text is not None and len(text) > self.sent:
            self.job.emit(("delta", text[self.sent :]))
            self.sent = len(text)
        self.done = True
        if reason == "cancelled":
            log.info("serve: request cancelled after %d tokens (its client went away)", len(self.tokens))
        self.job.emit(("done", reason, len(self.tokens)))
        return token if token is not None else 0
