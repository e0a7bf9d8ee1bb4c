"""The Hugging Face hub, when it cannot be reached: fail (or load from the cache) at once."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def go_offline_if_hub_unreachable(name: str) -> None:
    """Use only the local HF cache when the hub's host does not even resolve.

    Without this, huggingface_hub retries with back-off for about a minute before the
    one-line error; with it, a cached model loads at once and a missing one fails at once.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        import huggingface_hub.constants

        log.info("%s is unreachable: loading %s from the local HF cache only", host, name)
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
