"""What the Train tab tells someone who opens the UI for the first time: that MODEL_NAME is not on this machine
yet (and what to do: MODEL_NAME=tiny, or the download command `python -m app info` gives offline), and to press
Plan before Start. Checked offline, from the disk only: the page must open at once, with or without a network.
"""

from __future__ import annotations

from pathlib import Path

from app.core.hub import cached_model_dir, download_command
from app.models.artifacts import local_model_problem
from app.models.tiny import FAMILIES
from app.webui.paths import project

PLAN_HINT = (
    "**Press Plan first**: it shows what this run would use on this machine (tier, batch, memory, "
    "expected time) and starts nothing. Then Start."
)
TRY_TINY = (
    "To try the whole loop first, set MODEL_NAME=tiny: a tiny model built here in seconds, offline "
    "(its answers are noise)."
)


def model_note(name: str) -> str:
    """A note (Markdown) when MODEL_NAME is neither a local model dir nor in the Hugging Face cache, else ""."""
    name = name.strip()
    if not name or name in FAMILIES or Path(name).expanduser().is_dir():
        return ""  # a tiny model is built on first use; a dir's files are the pre-flight's to check, at Start
    missing = local_model_problem(name)
    if missing:
        return f"**{missing}**. {TRY_TINY}"
    if cached_model_dir(name) is not None:  # the HF cache's copy: read from disk, no hub asked
        return ""
    command, local = download_command(name)
    if (project() / local / "config.json").is_file():
        return f"**MODEL_NAME={name} is not in the Hugging Face cache, but {local} is here**: set MODEL_NAME={local}."
    return (
        f"**MODEL_NAME={name} is not downloaded here** (not under models/, not in the Hugging Face cache). "
        "Start downloads it from the hub if the hub can be reached (GBs); or download it once yourself: "
        f"`{command}`, then set MODEL_NAME={local}. {TRY_TINY}"
    )
