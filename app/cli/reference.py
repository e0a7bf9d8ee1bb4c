"""The reference texts, generated so that, like ``.env.template``, they follow the code and cannot
drift: docs/configuration.md (every setting), docs/commands.md (every make target) and the help of
``python -m app`` (``--help``, and ``<command> --help``: one command and the settings it reads).

The settings come from the config dataclasses (``Config.variables()``: help, choices, default,
``TIERED``); the targets from the Makefile's ``target: ... ## help`` comments under its ``##@ group``
lines, the same lines ``make help`` prints. tests/config/test_docs.py compares the committed pages with what
this writes. Regenerate both with ``.venv/bin/python -m app docs``.

Standard library and app.config only: it must run wherever ``make help`` does.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.config import (
    OTHER_PREFIXES,
    OTHER_VARIABLES,
    TIERED,
    Config,
    bounds,
    documented,
    setting_names_source,
    show,
)

REPO = Path(__file__).resolve().parents[2]
MAKEFILE = REPO / "Makefile"
PAGES = {
    "docs/configuration.md": "configuration_page",
    "docs/commands.md": "commands_page",
    "app/config/setting_names.py": "setting_names_page",
}
REGENERATE = ".venv/bin/python -m app docs"
_GENERATED = f"<!-- Generated from the code by app/cli/reference.py; do not edit. Regenerate: {REGENERATE} -->"

# A line under each section's heading (the names `make help` prints as [model], [data], ...),
# because some hold more than their name says (METHOD is under lora, ONNX_DIR under predict).
SECTION_TITLES = {
    "model": "The base model ([models and methods](training.md#methods-and-model-families)).",
    "data": "Training data ([data](data.md)).",
    "lora": "The tuning method, LoRA and P-Tuning ([methods](training.md#methods-and-model-families)).",
    "resources": "Memory, quantization and tiers ([memory and tiers](memory-and-tiers.md)).",
    "train": "The training run, checkpoints and resume ([training](training.md)).",
    "distributed": "Several processes and machines ([distributed](distributed.md)).",
    "predict": "Predict, chat, merge and ONNX export ([inference](inference.md)).",
    "evaluation": "Evaluation and the demo ([evaluation](evaluation.md)).",
    "serve": "The OpenAI-compatible API ([serving](serving.md)).",
    "webui": "The web UI ([web UI](webui.md)).",
}


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: '|' ends a cell (escaped everywhere, as GFM allows), and
    '<word ...>' reads as an HTML tag that GitHub hides, '*' as emphasis: those are escaped only
    outside `code spans`, where a backslash would show."""
    parts = str(text).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("\\", "\\\\").replace("<", "\\<").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def _default(value: str) -> str:
    return _cell(f"`{value}`") if value != "" else "*empty*"


def configuration_page() -> str:
    """docs/configuration.md: one table per config section, every variable once."""
    variables = Config.variables()
    sections = list(dict.fromkeys(sec for sec, _ in variables.values()))
    lines = [
        "# Configuration reference",
        "",
        _GENERATED,
        "",
        "Every setting is a variable, given on the command line (`make train LORA_R=16`, or "
        "`python -m app train LORA_R=16`), in the environment, or as a line `LORA_R=16` in `.env` "
        "(start from [`.env.template`](../.env.template), generated from the same code). Precedence: command line "
        "> environment > `.env` > default. Every value is checked before any work starts, and all problems are "
        "reported at once, one line each naming the variable and the fix.",
        "",
        "A name that is not a setting is an error however it was given: `make train MAX_SAMPLE=10` (make passes "
        "it through the environment, where it would otherwise be lost) and a `MAX_SAMPLE=` line in `.env` both "
        "stop with `unknown setting; did you mean MAX_SAMPLES?`. `.env` and the make command line may also carry "
        "what docker compose, the Makefile and the ML libraries read: "
        + ", ".join(f"`{v}`" for v in sorted(OTHER_VARIABLES))
        + ", and names starting with "
        + ", ".join(f"`{p}`" for p in OTHER_PREFIXES)
        + " (the compose ones are in [Docker](docker.md#compose-variables)).",
        "",
        "**tier** marks the settings `TIER=auto` decides from your RAM/VRAM when you leave them unset; the "
        "default shown is what `TIER=none` runs with, and a value you set always wins. `make info` shows each "
        "value and why ([tiers](memory-and-tiers.md#tiers)).",
        "",
        "Sections: " + " · ".join(f"[{sec}](#{sec})" for sec in sections) + ".",
    ]
    section = None
    for sec, var, shown, help_, choices in documented():
        if sec != section:
            lines += [
                "",
                f"## {sec}",
                "",
                SECTION_TITLES.get(sec, ""),
                "",
                "| variable | default | allowed | tier | meaning |",
                "|---|---|---|---|---|",
            ]
            section = sec
        _, f = variables[var]
        if choices:
            allowed = ", ".join(f"`{c}`" for c in choices)
        elif f.type in (bool, "bool"):  # annotations are strings under `from __future__ import annotations`
            allowed = "`true`, `false`"
        elif bounds(var):  # a number's range (app.config.fields)
            allowed = f"`{bounds(var)}`"
        else:
            allowed = ""
        lines.append(
            f"| `{var}` | {_default(show(shown))} | {allowed} | {'tier' if var in TIERED else ''} | {_cell(help_)} |"
        )
    return "\n".join(lines) + "\n"


def setting_names_page() -> str:
    """app/config/setting_names.py: every setting's name as the ``Setting`` type, which mypy checks names against."""
    return setting_names_source()


def make_targets(makefile: Path = MAKEFILE) -> list[tuple[str, str, str, str]]:
    """(group, target, help, what it runs) for each ``target: ... ## help`` line of the Makefile, in
    order: the lines `make help` lists (its awk: ``^##@ `` starts a group, ``^[a-z-]+:.*## `` a target)."""
    text = makefile.read_text(encoding="utf-8")
    listed = re.findall(r"^(?:##@ (.*)|([a-z-]+):.*## (.*))$", text, flags=re.M)
    names = {name for _, name, _ in listed if name}
    out, group = [], ""
    for heading, name, help_ in listed:
        if heading:
            group = heading.strip()
            continue
        head = re.search(rf"^{re.escape(name)}:([^#\n]*)##.*\n((?:\t.*\n)*)", text, flags=re.M)
        prereqs, recipe = (head.group(1).split(), head.group(2).splitlines()) if head else ([], [])
        runs = [f"make {p}" for p in prereqs if p in names and p != "setup"]
        runs += [c for c in (_command(line) for line in recipe) if c]
        out.append((group, name, help_.strip(), "; ".join(f"`{r}`" for r in runs)))
    return out


# The Makefile's own variables, as a reader would type the command (RUNTIME=local spelling).
_MAKE_VARS = {
    "$(APP)": "python -m app",
    "$(PYRUN)": "python",
    "$(HOSTPY)": "python",
    "$(PY)": "python",
    "$(COMPOSE)": "docker compose",
    "$(VENV)": ".venv",
}


def _command(line: str) -> str:
    """A recipe line as the command it runs; '' for echo lines and argument guards."""
    line = line.strip().lstrip("@")
    if not line or line.startswith(("echo", "[", "grep", "awk")):
        return ""
    line = line.split(" | ")[0]  # `--help | sed ...`: the command, not its formatting
    for var, value in _MAKE_VARS.items():
        line = line.replace(var, value)
    return line.replace("$$", "$").strip()


def commands_page(makefile: Path = MAKEFILE) -> str:
    """docs/commands.md: every target `make help` lists, with its help and what it runs."""
    lines = [
        "# Commands",
        "",
        _GENERATED,
        "",
        "Every target only calls `python -m app <command>` (or pytest, or a benchmark module); `make help` "
        "prints this list and every setting. With `RUNTIME=docker` (the default where a Docker engine answers) "
        "the same command runs in the image instead of `.venv` ([Docker](docker.md)); the first line of "
        "every `make` says which runtime and why. Targets that need the environment build it first "
        "(`make setup`). Settings are given as `make <target> VAR=value` ([configuration](configuration.md)); "
        "`python -m app --help` lists the commands of `python -m app` itself, and `python -m app <command> --help` "
        "what one of them does and the settings it reads.",
    ]
    group = None
    for grp, name, help_, runs in make_targets(makefile):
        if grp != group:  # `make help`'s groups, each its own table
            lines += [
                "",
                f"## {grp.split(':')[0].strip()}",
                "",
                _cell(grp.partition(":")[2].strip()),
                "",
                "| make target | what it does | runs |",
                "|---|---|---|",
            ]
            group = grp
        lines.append(f"| `make {name}` | {_cell(help_)} | {_cell(runs)} |")
    return "\n".join(lines) + "\n"


# ---- `python -m app --help` and `python -m app <command> --help` ---------------------------------------

WIDTH = 100  # `make help` and every --help fit a terminal this wide
_LEAD = "settings (KEY=value > environment > .env > default):"


def _wrap(line: str, indent: int) -> list[str]:
    """One help line cut to WIDTH columns, its continuation lines indented by ``indent``."""
    if len(line) <= WIDTH:
        return [line]
    return textwrap.wrap(
        line, WIDTH, subsequent_indent=" " * indent, break_long_words=False, break_on_hyphens=False
    ) or [line]


def settings_text(reads: tuple[str, ...] | None = None) -> str:
    """Config.help_text() under its [section] headings, cut to WIDTH: every setting, or those named in
    ``reads`` (a VARIABLE, or a section's name for all of it)."""
    out, section = [], ""
    for line in Config.help_text().splitlines():
        if line.startswith("["):
            section = line
        elif reads is None or line.split()[0] in reads or section.strip("[]") in reads:
            out += [] if section in out else [section]
            out += _wrap(line, 29)  # under the default ("  NAME<24> = "): room for the longest [choices]
    return "\n".join(out)


def usage_text(commands: Mapping[str, Any]) -> str:
    """`python -m app --help`: the commands (each with a .summary) and every setting."""
    cmds = "\n".join(x for name, c in commands.items() for x in _wrap(f"  {name:<16} {c.summary}", 19))
    return (
        f"usage: python -m app <command> [KEY=value ...]\n       python -m app <command> --help\n\n"
        f"commands:\n{cmds}\n\n{_LEAD}\n{settings_text()}\n"
    )


def command_help(name: str, summary: str, doc: str, reads: tuple[str, ...]) -> str:
    """`python -m app <command> --help`: its command line, what it does, the settings it reads."""
    paragraphs = [summary] + [" ".join(p.split()) for p in textwrap.dedent(doc).strip().split("\n\n") if p.strip()]
    text = (
        f"usage: python -m app {name} [KEY=value ...]\n\n"
        + "\n\n".join("\n".join(_wrap(p, 0)) for p in paragraphs)
        + "\n"
    )
    if reads:
        text += f"\n{_LEAD.replace('settings', 'settings it reads')}\n{settings_text(reads)}\n"
    return text + "\nevery command and setting: python -m app --help\n"


def write_pages() -> None:
    """`python -m app docs`: write the generated pages into the checkout (docs/), naming each."""
    for rel, func in PAGES.items():
        path = REPO / rel
        path.parent.mkdir(exist_ok=True)
        path.write_text(globals()[func](), encoding="utf-8")
        sys.stdout.write(f"wrote {rel}\n")  # cli-output
