"""`python -m app <command> [KEY=value ...]`: the command line (app.cli) and, on top of it, the web UI
(app.webui), which drives the same commands: this module puts the two tables together."""

from __future__ import annotations

import sys

from app.cli.commands import COMMANDS, Command
from app.cli.main import main as cli_main
from app.webui.command import WEBUI

ALL_COMMANDS: dict[str, Command] = {**COMMANDS, "webui": WEBUI}


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, ALL_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
