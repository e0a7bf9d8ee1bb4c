"""The generation engine behind `serve`: one worker thread owns the model.

Requests wait in a bounded queue (SERVE_MAX_QUEUE; a full one refuses at once, so memory does not grow
with the load). The worker takes the oldest, waits up to SERVE_BATCH_WAIT_MS for more requests for the
same adapter (at most SERVE_BATCH_SIZE) and generates them together: left-padded, one KV cache, one
forward pass per token for the whole batch, each row sampled with its own settings. Each request gets
its text as it comes, through its own ``emit``; a cancelled request (its client went away) stops at the
next token. A batch is one adapter: requests for different adapters never share a forward pass.
With INFER_BACKEND=llama.cpp each request of a batch is a sequence of llama.cpp's one context, and all
running rows are decoded together, one llama_decode per token; each row picks its tokens the same way.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """SERVE_MAX_QUEUE requests are already waiting."""


@dataclass
class Job:
    """One request: its adapter (None = the base), prompt token ids and sampling settings. ``emit`` gets
    ("delta", text), then one ("done", finish_reason, completion_tokens) or ("error", message)."""
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Runs ``models`` (app/serve/models.py: ``.model``, ``.use(name)``, ``.tokenizer_for(name)``, ``.lock``).
    A batch runs under ``models.lock``, as every change to the adapters does, so none sees another's weights."""

    def __init__(self, models: Any, max_queue: int, batch_size: int, batch_wait_s: float):
        self.models, self.lock = models, threading.RLock()
        models.lock = self.lock
        self.max_queue, self.batch_size, self.batch_wait_s = max_queue, batch_size, batch_wait_s
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._stopping = False
        model, tokenizer = models.model, models.tokenizer_for(None)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = (eos if isinstance(eos, list) else [eos]) if eos not in (None, []) else [tokenizer.eos_token_id]
        self.eos = {int(e) for e in eos if e is not None}  # where generate() stops, as predict does
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cv.notify()

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ---- the worker ----------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """The oldest waiting job and up to batch_size - 1 more for its adapter, waiting batch_wait_s for them."""
        with self._cv:
            while not self._waiting and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return []
            first = self._waiting.popleft()
            batch, deadline = [first], time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                for job in [j for j in self._waiting if j.adapter == first.adapter][: self.batch_size - len(batch)]:
                    self._waiting.remove(job)
                    batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.batch_size or left <= 0:
                    break
                self._cv.wait(left)
        return [j for j in batch if not _finish_if_cancelled(j)]

    def _run(self) -> None:
        while not self._stopping:
            batch = self._take()
            if not batch:
                continue
            try:
                with self.lock, self.models.use(batch[0].adapter):
                    self._generate(batch)
            except Exception as e:  # noqa: BLE001 - the server keeps serving; each request hears why
                log.exception("serve: generation failed")
                for job in batch:
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, jobs: list[Job]) -> None:
        import torch
        from transformers import DynamicCache

        if len(jobs) > 1:
            log.info("serve: %d requests for %s generated together", len(jobs), jobs[0].adapter or "the base")
        if hasattr(self.models.model, "step_logits"):  # llama.cpp (app/inference/llamacpp_model.py)
            return self._generate_sequences(jobs)
        n, longest = len(jobs), max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((n, longest), self.pad, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, job in enumerate(jobs):  # left-padded: every row's next token is at the same position
            ids[i, longest - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[i, longest - len(job.prompt_ids):] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row(job, self.models.tokenizer_for(job.adapter)) for job in jobs]
        model = self.models.model
        cache, inputs, device = DynamicCache(config=model.config), ids, model.device
        with torch.inference_mode():
            while True:
                out = model(input_ids=inputs.to(device), attention_mask=mask.to(device),
                            position_ids=position.to(device), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1, :].float().cpu()
                nxt = [row.step(logits[i], self.eos) if not row.done else self.pad for i, row in enumerate(rows)]
                if all(row.done for row in rows):
                    return
                inputs = torch.tensor(nxt, dtype=torch.long)[:, None]
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
                position = position[:, -1:] + 1

    def _generate_sequences(self, jobs: list[Job]) -> None:
        """llama.cpp: each job's prompt is prefilled as its own sequence (no padding), then one decode per token
        feeds every running row its last token at its own next position."""
        import torch

        model, rows = self.models.model, [_Row(job, self.models.tokenizer_for(job.adapter)) for job in jobs]
        model.reset()
        logits = [torch.from_numpy(model.prefill(job.prompt_ids, seq)) for seq, job in enumerate(jobs)]
        positions = [len(job.prompt_ids) for job in jobs]
        while True:
            nxt = {i: row.step(logits[i], self.eos) for i, row in enumerate(rows) if not row.done}
            live = [i for i in nxt if not rows[i].done]
            if not live:
                return
            out = model.step_logits([nxt[i] for i in live], [positions[i] for i in live], live)
            for k, i in enumerate(live):
                logits[i], positions[i] = torch.from_numpy(out[k]), positions[i] + 1


def _finish_if_cancelled(job: Job) -> bool:
    if job.cancelled.is_set():
        job.emit(("done", "cancelled", 0))
        return True
    return False


class _Row:
    """One request's generation: sampling, stop strings, and text sent so far (whole characters only)."""

    def __init__(self, job: Job, tokenizer: Any):
        import torch

        self.job, self.tokenizer, self.tokens, self.sent, self.done = job, tokenizer, [], 0, False
        self.generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming

    def step(self, logits: Any, eos: set[int]) -> int:
        """Pick the next token, send the text it completes; finish on EOS, a stop string, max_tokens or cancel."""
        if self.job.cancelled.is_set():
            return self._finish("cancelled")
        token = self._pick(logits)
        self.tokens.append(token)
        if token in eos:
            return self._finish("stop", token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.job.stop if s and s in text), default=-1)
        if cut >= 0:
            return self._finish("stop", token, text[:cut])
        if len(self.tokens) >= self.job.max_tokens:
            return self._finish("length", token, text)
        ready = len(text) - self.hold
        while ready > self.sent and text[ready - 1] == "\ufffd":  # half a character: wait for the rest
            ready -= 1
        if ready > self.sent:
            self.job.emit(("delta", text[self.sent:ready]))
            self.sent = ready
        return token

    def _pick(self, logits: Any) -> int:
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
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text is not None and len(text) > self.sent:
            self.job.emit(("delta", text[self.sent:]))
            self.sent = len(text)
        self.done = True
        if reason == "cancelled":
            log.info("serve: request cancelled after %d tokens (its client went away)", len(self.tokens))
        self.job.emit(("done", reason, len(self.tokens)))
        return token if token is not None else 0
