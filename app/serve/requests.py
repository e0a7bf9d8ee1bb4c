"""Request bodies of the OpenAI-compatible API, checked field by field: a bad one is an ApiError that
becomes a 400 (404 for an unknown model) in OpenAI's error shape, naming the field.

A field this server does not implement is refused rather than ignored when it asks for something
(``n=2``, a penalty, logprobs): an answer that quietly ignored it would not be what was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from app.config import Config

# Fields OpenAI clients send that change nothing here, or only at their neutral value.
NEUTRAL = {
    "n": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "top_logprobs": None,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "echo": False,
    "best_of": 1,
    "suffix": None,
    "parallel_tool_calls": None,
    "store": False,
}
IGNORED = {"user", "metadata", "service_tier"}  # informational only
CHAT = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
}
COMPLETION = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options"}
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Generation:
    """A checked request: which model, the prompt (chat messages or text), and how to sample."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_generation(body: dict[str, Any], chat: bool, cfg: Config) -> Generation:
    allowed = CHAT if chat else COMPLETION
    for key, value in body.items():
        if key in allowed or key in IGNORED:
            continue
        if key in NEUTRAL:
            if value is None or value == NEUTRAL[key] or (value == [] and key == "tools"):
                continue
            raise ApiError(
                400,
                f"{key}={json.dumps(value)[:40]} is not supported by this server; leave it out",
                key,
                "unsupported_parameter",
            )
        raise ApiError(
            400, f"unknown field {key!r}; this endpoint takes {', '.join(sorted(allowed))}", key, "unknown_parameter"
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: one of the ids GET /v1/models lists", "model")
    sv = cfg.serve
    default = min(cfg.predict.max_new_tokens, sv.serve_max_tokens)
    max_tokens = _number(
        body,
        "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
        int,
        default,
        1,
        sv.serve_max_tokens,
        "SERVE_MAX_TOKENS",
    )
    gen = Generation(
        model=model,
        max_tokens=int(max_tokens),
        temperature=_number(body, "temperature", float, cfg.predict.temperature, 0, 2),
        top_p=_number(body, "top_p", float, 1.0, 0, 1),
        stream=_flag(body, "stream"),
        include_usage=_include_usage(body),
        stop=_stop(body.get("stop")),
        seed=_seed(body.get("seed")),
    )
    if gen.top_p <= 0:
        raise ApiError(400, "top_p must be > 0 and <= 1", "top_p")
    if chat:
        gen.messages = _messages(body.get("messages"))
    else:
        gen.prompt = _prompt(body.get("prompt"))
    return gen


def _number(body: dict, key: str, kind: type, default: float, low: float, high: float, setting: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return default
    wrong = isinstance(value, bool) or not isinstance(value, (int, float))
    if wrong or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}", key)
    if not low <= value <= high:
        cap = f" (the server's cap, {setting})" if setting else ""
        raise ApiError(400, f"{key}={value} must be between {low} and {high}{cap}", key)
    return kind(value)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return bool(value)


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError(400, 'stream_options takes {"include_usage": true|false}', "stream_options")
    return bool(options.get("include_usage"))


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return stops


def _seed(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, "seed must be an integer", "seed")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages is required: a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must be the user's (or the system's), not the assistant's", "messages")
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value:
        raise ApiError(400, "prompt is required: one non-empty string", "prompt")
    return value
