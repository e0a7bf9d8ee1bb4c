"""Command line: ``python -m app <command> [KEY=value ...]``.

The Makefile and docker compose only call this. Settings come from KEY=value arguments,
the environment and .env (in that order of precedence); see ``python -m app --help``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from app.cli.commands import COMMANDS, PREFLIGHTED, Command, predict_mode
from app.config import Config, parse_cli_overrides
from app.core.errors import UserError

log = logging.getLogger("app")


def usage(commands: dict[str, Command] = COMMANDS) -> str:
    from app.cli.reference import usage_text

    return usage_text(commands)


def _command_help(name: str, commands: dict[str, Command]) -> str:
    from app.cli.reference import command_help

    c = commands[name]
    return command_help(name, c.summary, c.doc or c.run.__doc__ or "", c.reads)


def main(argv: list[str] | None = None, commands: dict[str, Command] = COMMANDS) -> int:
    """Run one command of ``commands``: these, plus what the layers above add (app/__main__.py: the web UI)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        wanted = argv[1] if len(argv) > 1 and argv[0] == "help" else ""
        sys.stdout.write(_command_help(wanted, commands) if wanted in commands else usage(commands))  # cli-output
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in commands and ("-h" in rest or "--help" in rest):
        sys.stdout.write(_command_help(cmd, commands))  # cli-output
        return 0
    from app.core.utils import setup_logging
    from app.training.signals import Interrupted, install_cli_handlers

    install_cli_handlers()  # SIGTERM (docker compose stop) ends any command cleanly, as PID 1 too
    setup_logging()
    if cmd not in commands:
        log.error("unknown command %r; choose one of: %s", cmd, ", ".join(commands))
        return 2
    try:
        overrides = parse_cli_overrides(rest)
        # validated once: by the pre-flight where a command has one (with the data's and the model's
        # problems, all at once), else here
        cfg = Config.load(overrides, validate=cmd not in PREFLIGHTED)
        if cmd == "predict":
            cmd = predict_mode(cfg, {k.upper() for k in overrides})
        commands[cmd].run(cfg)
    except UserError as e:
        for line in e.problems:
            log.error("%s", line)
        return 2
    except Interrupted as e:  # a stop signal; train has said where its checkpoint is
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; the last checkpoint in OUTPUT_DIR/checkpoints is kept and resumes next run")
        return 130
    except OSError as e:  # a full disk in a writer that has no line of its own: still one line, no traceback
        from app.core.diskspace import full_line, is_full

        where = Path(e.filename or ".")
        if not is_full(e, where):
            raise
        log.error(
            "%s",
            full_line(
                "",
                where,
                f"running `{cmd}`",
                None,
                "files written whole before it are intact",
                "run the same command again",
                "free some space there",
            ),
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
