"""What every tab shares: the settings the UI started with (defaults < .env < environment), the jobs it runs,
the chat backend, and how a refusal is shown: the command line's own one-line messages, one per line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.config import Config
from app.core.errors import UserError
from app.webui.chat_backend import ChatBackend
from app.webui.jobs import Jobs


@dataclass
class Context:
    cfg: Config
    jobs: Jobs = field(default_factory=Jobs)
    last_train: dict[str, dict[str, str]] = field(default_factory=dict)  # run dir -> the overrides it started with
    backend: ChatBackend | None = None
    forms: dict[str, Any] = field(default_factory=dict)  # tab -> its Form (app/webui/forms.py), once built

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = ChatBackend(self.jobs)


def checked(command: str, overrides: dict[str, str]) -> Config:
    """The Config ``python -m app <command> KEY=value ...`` would run with, after the same checks it makes
    before doing anything (the path guard first): a UserError with their one-line messages, else the Config."""
    from app.cli.preflight import preflight
    from app.webui.paths import path_problems

    if bad := path_problems(overrides):
        raise UserError(bad)
    cfg = Config.load(overrides, validate=False)
    preflight(cfg, command)
    return cfg


def problems_of(e: BaseException) -> str:
    """A UserError's lines (each names the setting and the fix), as the CLI logs them."""
    return "\n".join(e.problems) if isinstance(e, UserError) else str(e)
