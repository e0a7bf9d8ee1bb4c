"""`python -m app serve`: load the base and its adapters once, then answer HTTP until stopped."""

from __future__ import annotations

import ipaddress
import logging
import socket

from app.config import Config
from app.core.utils import set_threads

log = logging.getLogger(__name__)


def run_serve(cfg: Config) -> None:
    from app.serve.parent import end_with_parent

    end_with_parent()  # first: a server the UI started must not load a model for a UI that is gone
    if cfg.predict.infer_backend == "llama.cpp":  # serve has no pre-flight: before anything heavy loads
        from app.inference.llamacpp import require

        require("INFER_BACKEND=llama.cpp")
    import uvicorn

    from app.serve.api import create_app
    from app.serve.engine import Engine
    from app.serve.model_pool import ServedModels

    sv = cfg.serve
    can_listen(sv.serve_host, sv.serve_port)  # before minutes of loading, not after
    set_threads(cfg.model.num_threads)
    models = ServedModels(cfg)
    engine = Engine(models, sv.serve_max_queue, sv.serve_batch_size, sv.serve_batch_wait_ms / 1000)
    if not loopback(sv.serve_host) and not sv.api_key:
        log.warning(
            "SERVE_HOST=%s answers every client that reaches port %d, and API_KEY is not set: set API_KEY, "
            "or SERVE_HOST=127.0.0.1 for this machine only",
            sv.serve_host,
            sv.serve_port,
        )
    log.info(
        "serve: %s on http://%s:%d/v1 (%s)",
        ", ".join(models.names()),
        sv.serve_host,
        sv.serve_port,
        "API key required" if sv.api_key else "no API key",
    )
    try:
        uvicorn.run(
            create_app(models, engine, cfg),
            host=sv.serve_host,
            port=sv.serve_port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.stop()


def can_listen(host: str, port: int, setting: str = "SERVE") -> None:
    """A one-line UserError when <setting>_HOST:<setting>_PORT cannot be listened on (taken, or no such address)."""
    from app.core.errors import UserError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: only a listener blocks it
            s.bind((host, port))
    except OSError as e:
        why = e.strerror or str(e)
        raise UserError(
            f"{setting}_PORT={port}: cannot listen on {host}:{port} ({why}); another server may hold "
            f"it: stop it or choose another {setting}_PORT (and check {setting}_HOST)"
        ) from None


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
