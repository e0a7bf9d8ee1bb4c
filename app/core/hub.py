"""The Hugging Face hub, when it cannot be reached: fail (or load from the cache) at once, and say what
the local HF cache holds of a model and how to download the rest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_switched: list[str] = []  # the host that did not resolve, once go_offline_if_hub_unreachable set HF_HUB_OFFLINE


def go_offline_if_hub_unreachable(name: str) -> None:
    """Use only the local HF cache when the hub's host does not even resolve.

    Without this, huggingface_hub retries with back-off for about a minute before the
    one-line error; with it, a cached model loads at once and a missing one fails at once.
    """
    if Path(name).exists() or _offline_by_setting():
        return
    host = _unresolved_host()
    if host:
        import huggingface_hub.constants

        log.info("%s is unreachable: loading %s from the local HF cache only", host, name)
        _switched.append(host)
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def hub_out_of_reach() -> str | None:
    """Why a load cannot fetch from the hub ('HF_HUB_OFFLINE=1', '<host> does not resolve'), or None.
    Changes nothing (go_offline_if_hub_unreachable is what switches the libraries to the cache)."""
    if _offline_by_setting():  # the user's, or ours for a host that did not resolve
        return f"{_switched[0]} does not resolve" if _switched else f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}"
    host = _unresolved_host()
    return f"{host} does not resolve" if host else None


def cached_model_dir(name: str) -> Path | None:
    """The local HF cache's snapshot dir of hub model ``name`` (the revision `main` points to), when its
    config.json is there; else None (not a hub name, or not cached). Reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json")
    except (ValueError, OSError):  # HFValidationError (a ValueError): not a repo id; an unreadable cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def download_command(name: str) -> tuple[str, str]:
    """(the shell command that downloads hub model ``name`` into models/, the MODEL_NAME to use then).

    Into models/ rather than the HF cache: models/ is mounted in the container too, so the same
    download serves both runtimes. ``hf`` is huggingface_hub's CLI, installed in .venv."""
    local = f"models/{Path(name.rstrip('/')).name}"
    return f".venv/bin/hf download {name} --local-dir {local}", local


def _offline_by_setting() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def _unresolved_host() -> str | None:
    """The hub's host when it does not resolve (no network, no DNS), else None."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None
