"""`python -m app webui`, the command the layer above the CLI adds (app/__main__.py puts it in the table).
Light on purpose: every `python -m app` imports this, and Gradio loads only when the UI starts."""

from __future__ import annotations

from app.cli.commands import Command
from app.config import Config


def _webui(cfg: Config) -> None:
    """Opens a browser UI on WEBUI_HOST:WEBUI_PORT (http://127.0.0.1:7860 by default) for the whole loop: Train
    (settings, data upload, Plan, Start/Stop/Resume, live curves), Runs, Chat (through `serve`), Evaluate and
    Export. Every action runs the same `python -m app` command the UI shows, as its own process: on a host,
    stopping the UI never stops a training run (in a container it stops them with a checkpoint first).
    Another address than 127.0.0.1 needs WEBUI_AUTH=user:password."""
    from app.webui.ui_server import run_webui

    run_webui(cfg)


WEBUI = Command(_webui, "open the web UI (train, watch, chat, evaluate, export) on WEBUI_PORT", ("webui",))
