"""The Chat tab's backend: `python -m app serve` itself (app/serve), started by the UI on a free 127.0.0.1 port
for the base the picked adapter was trained on, and asked over its OpenAI-compatible API with streaming.
Another adapter of the same base is hot-loaded (load_lora_adapter); another base, or other serve settings,
restart it. The UI process itself loads no model.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from app.core.errors import UserError
from app.serve.adapters import read_adapter

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam
from app.webui.jobs import Jobs
from app.webui.paths import project

BASE = "base model"  # the picker's entry for the base model alone
KEY = "chat-backend"
START_TIMEOUT_S = 900  # loading a 6B base from disk on a slow PC takes minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChatBackend:
    def __init__(self, jobs: Jobs):
        self.jobs, self.port, self.base, self.settings = jobs, 0, "", {}  # type: ignore[var-annotated]
        self.loaded: set[str] = set()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ensure(self, choice: str, model_name: str, settings: dict[str, str]) -> str:
        """Make the backend answer for ``choice`` (BASE, or a run dir under models/): the request's model name."""
        if choice == BASE:
            base, name = model_name, None
        else:
            name = Path(choice).name
            adapter = read_adapter(name, project() / choice)
            if adapter.method == "ptuning":
                raise UserError(
                    f"ADAPTER_DIR={choice}: a P-Tuning prefix cannot be served; chat with it with "
                    f"`make chat ADAPTER_DIR={choice}`"
                )
            base = adapter.base or model_name
        job = self.jobs.get(KEY)
        if job is None or not job.running() or base != self.base or settings != self.settings:
            # the first adapter names the base and its QUANT_LEVEL, as it was trained (serve's own rule)
            self._start(
                base,
                settings,
                {"MODEL_NAME": base, "ADAPTERS": "none"} if name is None else {"ADAPTERS": f"{name}={choice}"},
            )
            if name is not None:
                self.loaded.add(name)
        if name is None:
            return self._models()[0]
        if name not in self.loaded:
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": choice})
            self.loaded.add(name)
        return name

    def _start(self, base: str, settings: dict[str, str], what: dict[str, str]) -> None:
        old = self.jobs.get(KEY)
        if old is not None and old.running():
            old.stop()
            self.jobs.wait(KEY, 30)
        self.port, self.base, self.settings, self.loaded = free_port(), base, dict(settings), set()
        job = self.jobs.start(
            KEY,
            "serve",
            {**settings, **what, "API_KEY": "", "SERVE_HOST": "127.0.0.1", "SERVE_PORT": str(self.port)},
            tied=True,
        )  # it ends with the UI
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not job.running():
                raise UserError(job.errors() or [f"the chat backend ended ({job.status()}); see {job.log}"])
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise UserError(f"the chat backend did not answer in {START_TIMEOUT_S} s; see {job.log}")

    def _models(self) -> list[str]:
        with urllib.request.urlopen(self.url("/v1/models"), timeout=10) as r:
            return [m["id"] for m in json.load(r)["data"]]

    def _post(self, path: str, body: dict) -> None:
        req = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(req, timeout=600).close()
        except urllib.error.HTTPError as e:
            try:
                message = json.load(e)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = str(e)
            raise UserError(message) from None

    def stream(self, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> Iterator[str]:
        """The answer as it grows, token by token (Server-Sent Events through openai's client)."""
        from openai import OpenAI

        client = OpenAI(base_url=self.url("/v1"), api_key="webui", timeout=600, max_retries=0)
        text = ""
        for chunk in client.chat.completions.create(
            model=model,
            messages=cast("list[ChatCompletionMessageParam]", messages),  # role/content dicts, as the API takes
            stream=True,
            max_tokens=max_tokens,
            temperature=temperature,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text
