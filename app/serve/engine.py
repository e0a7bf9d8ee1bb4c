"""The generation engine behind `serve`: one worker thread owns the model and keeps a running batch.

Requests wait in a bounded queue (SERVE_MAX_QUEUE; a full one refuses at once, so memory does not grow with
the load). With no batch running, the worker takes the oldest request and waits up to SERVE_BATCH_WAIT_MS for
more for the same adapter (at most SERVE_BATCH_SIZE) to start a batch with. From then on the batch is
continuous, as vLLM's: between two decode steps, requests for the batch's adapter that wait join it (up to
SERVE_BATCH_SIZE rows in all; prefilled apart, then merged: app/serve/batch.py), and each row leaves the
moment it finishes. A request is therefore answered from the next step on, not after the batch before it.
A step prefills at most PREFILL_TOKENS prompt tokens (a longer prompt alone), the batch's first included: a
wave of requests is taken over a few steps, so its first answer before its last are prefilled.
Each row is sampled with its own settings and gets its text as it comes, through its own ``emit``; a cancelled
request (its client went away) stops at the next token.

A batch is one adapter: requests for different adapters never share a forward pass. So that none waits for
ever, a request joins only while no request for another adapter waits before it, and none joins while an
adapter is being loaded or unloaded (they wait for the engine's lock): the batch then drains, and the oldest
waiting request starts the next. A model whose KV cache has other than full-attention layers (sliding
windows, as Gemma 3's) takes no joiners: each of its batches runs to its end, as a line at start says.
With INFER_BACKEND=llama.cpp each row is a sequence of llama.cpp's one context and rows join the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.inference.llamacpp_model import LlamaCppCausalLM
from app.serve.batch import Row, SequenceBatch, TorchBatch, joinable

if TYPE_CHECKING:
    from app.serve.model_pool import ServedModels

log = logging.getLogger(__name__)

# The most prompt tokens prefilled in one step (as vLLM's max_num_batched_tokens): the running rows wait that
# long for their next token at most, and a wave of requests is answered in turn rather than all at its end.
PREFILL_TOKENS = 512


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


class EngineLock:
    """A re-entrant lock that counts the threads waiting for it: a running batch that kept taking requests
    would otherwise hold off an adapter's load or unload for as long as requests come."""

    def __init__(self) -> None:
        self._lock, self._count, self.waiting = threading.RLock(), threading.Lock(), 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self.waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> EngineLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @contextlib.contextmanager
    def after_others(self) -> Iterator[None]:
        """Held, once no other thread waits for it: the worker lets a waiting adapter change go first."""
        while self.waiting:
            time.sleep(0.005)
        with self:
            yield


class Engine:
    """Runs ``models`` (app/serve/model_pool.py: ``.model``, ``.use(name)``, ``.tokenizer_for(name)``, ``.lock``).
    A batch runs under ``models.lock``, as every change to the adapters does, so none sees another's weights."""

    def __init__(self, models: ServedModels, max_queue: int, batch_size: int, batch_wait_s: float):
        self.models, self.lock = models, EngineLock()
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
        self.joinable = isinstance(model, LlamaCppCausalLM) or joinable(model)  # llama.cpp: a sequence a row
        if not self.joinable:
            log.info(
                "serve: %s's KV cache has sliding-window (or other non-full-attention) layers, which cannot be "
                "padded to merge rows: each batch runs to its end, and requests arriving meanwhile wait for it",
                type(model).__name__,
            )
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

    def _joiners(self, adapter: str | None, room: int, tokens: int) -> list[Job]:
        """The waiting jobs for ``adapter`` ahead of any other adapter's that fit ``room`` rows and the step's
        prefill (``tokens`` taken already), unless the batch must drain: a model that cannot merge rows, an
        adapter change waiting for the lock, or a stop."""
        if room <= 0 or not self.joinable or self.lock.waiting or self._stopping:
            return []
        with self._cv:
            ahead = list(itertools.takewhile(lambda j: j.adapter == adapter, self._waiting))
            jobs = _within(ahead, room, tokens)
            for _ in jobs:
                self._waiting.popleft()
        return [j for j in jobs if not _finish_if_cancelled(j)]

    def _run(self) -> None:
        while not self._stopping:
            jobs = self._take()
            if not jobs:
                continue
            rows: list[Row] = []
            try:
                with self.lock.after_others(), self.models.use(jobs[0].adapter):
                    left = self._generate(jobs, rows)
                with self._cv:  # taken, never started: they go first again
                    self._waiting.extendleft(reversed(left))
            except Exception as e:  # the server keeps serving (logged with its traceback); each request hears why
                log.exception("serve: generation failed")
                started = {id(row.job) for row in rows}
                for job in [j for j in jobs if id(j) not in started] + [r.job for r in rows if not r.done]:
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, jobs: list[Job], rows: list[Row]) -> list[Job]:
        """Run a batch of ``jobs`` (taken PREFILL_TOKENS at a time) and the requests that join it, between steps,
        until its last row finishes; ``rows`` gets every row it ran (the caller tells those not done of an
        error). -> the jobs it never started (every row finished first: they start the next batch)."""
        adapter, model, pending = jobs[0].adapter, self.models.model, list(jobs)
        if len(jobs) > 1:
            log.info("serve: %d requests for %s generated together", len(jobs), adapter or "the base")
        batch: SequenceBatch | TorchBatch = (
            SequenceBatch(model, self.eos, self.batch_size)
            if isinstance(model, LlamaCppCausalLM)
            else TorchBatch(model, self.pad, self.eos, trim=self.joinable)
        )
        tokenizer = self.models.tokenizer_for(adapter)
        admit = _next(pending, len(pending), 0)
        if not self.joinable:  # a cache that cannot take rows in later (sliding windows): all at once
            admit, pending = admit + pending, []
        while True:
            if admit:
                if batch.rows:
                    log.debug("serve: %d requests join the running batch of %d", len(admit), len(batch.rows))
                new = [Row(job, tokenizer) for job in admit]
                rows.extend(new)
                batch.admit(new)
            batch.step()
            if not batch.rows:  # the next request starts a batch of its own, as on a fresh model
                return pending
            room = self.batch_size - len(batch.rows)
            admit = _next(pending, room, 0)
            if not pending:  # then those that came since, while they may join
                admit += self._joiners(adapter, room - len(admit), sum(len(j.prompt_ids) for j in admit))


def _next(pending: list[Job], room: int, tokens: int) -> list[Job]:
    """Take from ``pending`` the first that fit (``_within``), and of those the ones not cancelled meanwhile."""
    taken = _within(pending, room, tokens)
    del pending[: len(taken)]
    return [j for j in taken if not _finish_if_cancelled(j)]


def _within(jobs: list[Job], room: int, tokens: int) -> list[Job]:
    """The first of ``jobs`` that fit ``room`` rows and, with ``tokens`` taken already, one step's prefill
    (PREFILL_TOKENS; a longer prompt is taken alone)."""
    out: list[Job] = []
    for job in jobs[: max(room, 0)]:
        tokens += len(job.prompt_ids)
        if tokens > PREFILL_TOKENS and tokens > len(job.prompt_ids):
            break
        out.append(job)
    return out


def _finish_if_cancelled(job: Job) -> bool:
    if job.cancelled.is_set():
        job.emit(("done", "cancelled", 0))
        return True
    return False
