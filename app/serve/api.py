"""The OpenAI-compatible HTTP API of `serve` (FastAPI; streaming as server-sent events, sse-starlette).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, and vLLM's
POST /v1/load_lora_adapter and /v1/unload_lora_adapter. The request's ``model`` picks the adapter (the
base's id: no adapter). Every error is OpenAI's shape, {"error": {message, type, param, code}}.

Limits, each a setting: API_KEY (401 without the bearer token), SERVE_MAX_BODY_KB, SERVE_MAX_PROMPT_TOKENS,
SERVE_MAX_TOKENS (400), SERVE_MAX_QUEUE (429). A client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Request  # FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from app.config import Config
from app.inference.terminal_chat import context_size
from app.serve.engine import Engine, Job, QueueFull
from app.serve.requests import ApiError, Generation, parse_generation, parse_json

if TYPE_CHECKING:
    from app.serve.model_pool import ServedModels


def create_app(models: ServedModels, engine: Engine, cfg: Config) -> FastAPI:
    routes = _Routes(models, engine, cfg)
    app = FastAPI(title="ChatGLM-CPU-Trainer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.get("/health")(routes.health)
    # every /v1 route needs the key: a dependency, so that streams stay unwrapped
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(routes.authorized)])
    v1.get("/models")(routes.list_models)
    v1.post("/chat/completions")(routes.chat_completions)
    v1.post("/completions")(routes.completions)
    v1.post("/load_lora_adapter")(routes.load_lora_adapter)
    v1.post("/unload_lora_adapter")(routes.unload_lora_adapter)
    app.include_router(v1)
    return app


# Starlette types every handler as taking an Exception; each is registered for its own class only.
async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    e = cast(ApiError, exc)
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:  # unknown route, wrong method
    e = cast(HTTPException, exc)
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


class _Routes:
    """The route handlers over one server's models, engine and settings."""

    def __init__(self, models: ServedModels, engine: Engine, cfg: Config):
        self.models, self.engine, self.cfg, self.sv = models, engine, cfg, cfg.serve

    async def authorized(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        key = self.sv.api_key
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "a valid API key is required: 'Authorization: Bearer <API_KEY>'",
                code="invalid_api_key",
                kind="authentication_error",
            )

    async def body_of(self, request: Request) -> dict[str, Any]:
        raw, cap = bytearray(), self.sv.serve_max_body_kb * 1024
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                raise ApiError(400, f"the request body is over {self.sv.serve_max_body_kb} KB (SERVE_MAX_BODY_KB)")
        return parse_json(bytes(raw))

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "waiting": self.engine.waiting(), "models": len(self.models.names())}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": self.models.listing()}

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, parse_generation(await self.body_of(request), True, self.cfg), True)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, parse_generation(await self.body_of(request), False, self.cfg), False)

    async def load_lora_adapter(self, request: Request) -> Any:
        from app.core.errors import UserError
        from app.serve.adapters import inside, read_adapter

        body = await self.body_of(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "lora_name and lora_path are required strings", "lora_name")
        root = self.models.root
        where = inside(root, path)
        if where is None:
            raise ApiError(400, f"lora_path must be a dir inside {root}/ (no '..', no symlink out of it)", "lora_path")
        try:
            await run_in_threadpool(self.models.load, read_adapter(name, where))
        except UserError as e:
            raise ApiError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: Request) -> Any:
        name = (await self.body_of(request)).get("lora_name")
        if not isinstance(name, str) or name not in self.models.adapters:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "lora_name", "model_not_found")
        await run_in_threadpool(self.models.unload, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def _complete(self, request: Request, gen: Generation, chat: bool) -> Any:
        job, events = self._submit(gen)
        reply = _Reply(gen, chat, job)
        if gen.stream:
            return EventSourceResponse(reply.chunks(events), ping=15)
        try:
            text, reason, used = await _collect(request, events)
        finally:
            job.cancelled.set()  # a no-op once done; stops the generation if the client left (or on error)
        return reply.whole(text, reason, used)

    def _prompt_ids(self, gen: Generation, adapter: str | None) -> list[int]:
        """The prompt's token ids, refused (400) over SERVE_MAX_PROMPT_TOKENS or the model's context."""
        tokenizer = self.models.tokenizer_for(adapter)
        if gen.messages is not None:
            from app.data.encode import prompt_text

            ids = tokenizer(prompt_text(tokenizer, gen.messages), add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(gen.prompt)["input_ids"]
        context = context_size(self.models.model, tokenizer) or 10**9  # the chat's own reading of the limit
        limit = min(self.sv.serve_max_prompt_tokens, context - gen.max_tokens)
        if len(ids) > limit:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; at most {limit} are accepted with max_tokens="
                f"{gen.max_tokens} (SERVE_MAX_PROMPT_TOKENS, the model's context)",
                "messages" if gen.messages is not None else "prompt",
                "context_length_exceeded",
            )
        return list(ids)

    def _submit(self, gen: Generation) -> tuple[Job, asyncio.Queue]:
        adapter = None if gen.model == self.models.base_name else gen.model
        if adapter is not None and adapter not in self.models.adapters:
            raise ApiError(
                404,
                f"The model `{gen.model}` does not exist; GET /v1/models lists the served ones",
                "model",
                "model_not_found",
            )
        ids = self._prompt_ids(gen, adapter)
        loop, events = asyncio.get_running_loop(), asyncio.Queue[tuple[Any, ...]]()

        def emit(event: tuple[Any, ...]) -> None:  # from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(
            adapter,
            ids,
            gen.max_tokens,
            emit,
            gen.temperature,
            gen.top_p,
            gen.stop,
            gen.seed,
        )
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(
                429,
                f"the server is busy: {self.sv.serve_max_queue} requests are waiting (SERVE_MAX_QUEUE); retry shortly",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            ) from None
        return job, events


async def _collect(request: Request, events: asyncio.Queue) -> tuple[str, str, int]:
    """A whole (not streamed) answer's text, finish reason and token count; 499 when the client left."""
    text: list[str] = []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None
            continue
        if event[0] == "delta":
            text.append(event[1])
        elif event[0] == "done":
            return "".join(text), event[1], event[2]
        else:
            raise ApiError(500, event[1], kind="server_error")


class _Reply:
    """OpenAI's response objects for one request: whole, or as chunks of a stream."""

    def __init__(self, gen: Generation, chat: bool, job: Job):
        self.gen, self.chat, self.job = gen, chat, job
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        self.chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def _usage(self, used: int) -> dict[str, int]:
        prompt = len(self.job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}

    def _object(self, choices: list[dict], kind: str, usage: dict | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.gen.model, "choices": choices}
        return {**out, "usage": usage} if usage is not None else out

    def whole(self, text: str, reason: str, used: int) -> dict[str, Any]:
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if self.chat
            else {"index": 0, "text": text, "logprobs": None}
        )
        return self._object([{**choice, "finish_reason": reason}], self.kind, self._usage(used))

    def _chunk(self, delta: str | None, reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            body = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": body, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        return json.dumps(self._object([choice], self.chunk_kind), ensure_ascii=False)

    async def chunks(self, events: asyncio.Queue) -> AsyncIterator[dict[str, str]]:
        """The stream; sse-starlette closes this generator when the client goes away, which cancels the job."""
        try:
            if self.chat:
                yield {"data": self._chunk(None, first=True)}
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield {"data": self._chunk(event[1])}
                    continue
                if event[0] == "error":
                    yield {"data": json.dumps(ApiError(500, event[1], kind="server_error").body())}
                    break
                yield {"data": self._chunk(None, event[1])}
                if self.gen.include_usage:
                    yield {"data": json.dumps(self._object([], self.chunk_kind, self._usage(event[2])))}
                break
            yield {"data": "[DONE]"}
        finally:
            self.job.cancelled.set()
