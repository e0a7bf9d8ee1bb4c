"""The Chat tab: the base model or any adapter, multi-turn, streamed from `python -m app serve`
(app/webui/chat_backend.py), with the generation settings and serve's own under Advanced; Reset clears the
conversation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from app.core.errors import UserError
from app.webui import run_view
from app.webui.chat_backend import BASE
from app.webui.context import Context, problems_of
from app.webui.forms import Form, named
from app.webui.paths import path_problems


def build(ctx: Context) -> Form:
    pick = gr.Dropdown(
        [BASE, *run_view.adapters()],
        value=(run_view.adapters() or [BASE])[0],
        label="Model",
        allow_custom_value=True,
        elem_id="chat-model",
        info="the base model alone, or a trained adapter on its base",
    )
    chatbot = gr.Chatbot(label="Chat", elem_id="chat-box", height=360)
    with gr.Row():
        text = gr.Textbox(label="Message", scale=4, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        reset = gr.Button("Reset", scale=1, elem_id="chat-reset")
    message = gr.Textbox(label="Message from the backend", interactive=False, elem_id="chat-message")
    form = Form("chat", ctx.cfg)
    fields = form.components()
    backend = ctx.backend
    assert backend is not None

    def answer(
        choice: str, prompt: str, history: list[dict[str, Any]] | None, *values: Any
    ) -> Iterator[tuple[Any, str, str]]:
        history = list(history or [])
        if not prompt.strip():
            yield history, "", "type a message first"
            return
        try:
            overrides = form.overrides(list(values))
            if bad := path_problems({**overrides, **({} if choice == BASE else {"ADAPTER_DIR": choice})}):
                raise UserError(bad)
            model_name = overrides.pop("MODEL_NAME", ctx.cfg.model.model_name)
            max_tokens = int(float(overrides.pop("MAX_NEW_TOKENS", ctx.cfg.predict.max_new_tokens)))
            temperature = float(overrides.pop("TEMPERATURE", ctx.cfg.predict.temperature))
            history.append({"role": "user", "content": prompt})
            yield history, "", f"loading {choice} (the first message after a switch loads the model)"
            model = backend.ensure(choice, model_name, overrides)
            turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
            history.append({"role": "assistant", "content": ""})
            for partial in backend.stream(model, turns, max_tokens, temperature):
                history[-1]["content"] = partial
                yield history, "", ""
        except UserError as e:
            yield history, "", problems_of(e)

    def refresh_models() -> dict[str, Any]:
        return gr.update(choices=[BASE, *run_view.adapters()])

    inputs = [pick, text, chatbot, *fields]
    send.click(named(answer, ["model", "message", "history"], form), inputs, [chatbot, text, message], api_name="chat")
    text.submit(answer, inputs, [chatbot, text, message], api_visibility="private")
    reset.click(lambda: ([], ""), None, [chatbot, message], api_name="chat_reset")
    pick.focus(refresh_models, None, pick, api_visibility="private")
    return form


def _text(content: Any) -> str:
    """A chat message's text (Gradio may hand back a list of parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)
