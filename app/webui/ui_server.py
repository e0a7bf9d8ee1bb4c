"""`python -m app webui`: check the address and the login, build the page, serve it until stopped."""

from __future__ import annotations

import logging
import os

from app.config import Config
from app.core.errors import UserError
from app.serve.api_server import can_listen, loopback

log = logging.getLogger(__name__)


def run_webui(cfg: Config) -> None:
    ui = cfg.webui
    if not loopback(ui.webui_host) and not ui.webui_auth:
        raise UserError(
            f"WEBUI_HOST={ui.webui_host} lets anyone who reaches port {ui.webui_port} train, read runs "
            "and upload files, and WEBUI_AUTH is not set: set WEBUI_AUTH=user:password, or "
            "WEBUI_HOST=127.0.0.1 for this machine only"
        )
    can_listen(ui.webui_host, ui.webui_port, "WEBUI")  # before Gradio's import and build, not after
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline PCs: no usage reports to send
    from app.webui.context import Context
    from app.webui.ui import build

    ctx = Context(cfg)
    blocks = build(ctx)
    auth = tuple(ui.webui_auth.split(":", 1)) if ui.webui_auth else None
    log.info(
        "web UI on http://%s:%d (%s); Ctrl-C stops the UI, never a training run it started",
        ui.webui_host,
        ui.webui_port,
        "login required" if auth else "no login: this machine only",
    )
    try:
        blocks.queue(default_concurrency_limit=4).launch(
            server_name=ui.webui_host,
            server_port=ui.webui_port,
            auth=auth,
            quiet=True,
            show_error=True,
            max_file_size=ui.webui_max_upload_mb * 2**20,
            footer_links=["api"],
        )
    finally:
        ctx.jobs.stop_all()
