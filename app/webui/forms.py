"""The UI's forms, generated from the config tree: one component per setting, with the setting's name as its
label, its help as the hint, its Literal choices as a dropdown, and the value the command line would use now
(defaults < .env < environment). A tab shows the settings its commands read (app.cli.commands.COMMANDS); a
setting added to app/config/fields.py appears in every tab whose command reads its section, with no UI code.

A form turns back into the command line the user could paste: ``KEY=value`` for each setting that differs
from what the command would use anyway. The settings TIER=auto decides, and OUTPUT_DIR (derived from
MODEL_NAME and METHOD), start blank unless set, so leaving them blank leaves the decision to the tool.
"""

from __future__ import annotations

import inspect
import shlex
import sys
from collections.abc import Callable
from typing import Any

import gradio as gr

from app.cli.commands import COMMANDS
from app.config import TIERED, Config, ConfigError, Setting, bounds, choices, is_setting, show
from app.config.settings import field_type
from app.config.values import parse_value

# The commands behind each tab: the tab's form holds every setting they read.
TAB_COMMANDS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "evaluate": ("evaluate",),
    "export": ("merge", "export-onnx", "export-gguf"),
    "chat": ("serve",),
}
# Shown open at the top of a tab; the rest of its settings are under "Advanced", by section.
MAIN: dict[str, tuple[Setting, ...]] = {
    "train": (
        "MODEL_NAME",
        "DATA_PATH",
        "METHOD",
        "STAGE",
        "PREF_LOSS",
        "PREF_BETA",
        "QUANT_LEVEL",
        "OUTPUT_DIR",
        "NUM_EPOCHS",
        "MAX_STEPS",
        "LEARNING_RATE",
        "BATCH_SIZE",
        "GRAD_ACCUM",
        "MAX_SEQ_LEN",
        "MAX_SAMPLES",
        "LORA_R",
    ),
    "evaluate": ("EVAL_PATH", "EVAL_SAMPLES"),
    "export": ("MERGED_DIR", "ONNX_DIR", "GGUF_QUANT", "GGUF_DIR"),
    "chat": ("MAX_NEW_TOKENS", "TEMPERATURE"),
}
# Settings no form shows, each with the reason (tests/webui/test_webui.py: every other setting is in a form).
NOT_IN_UI: dict[Setting, str] = {
    "WEBUI_HOST": "the UI's own address: given when it starts",
    "WEBUI_PORT": "the UI's own port",
    "WEBUI_AUTH": "the UI's own login",
    "WEBUI_MAX_UPLOAD_MB": "the UI's own upload limit",
    "SERVE_HOST": "the chat backend listens on 127.0.0.1 only",
    "SERVE_PORT": "the chat backend takes a free port",
    "API_KEY": "the chat backend answers only this UI, on 127.0.0.1",
    "ADAPTERS": "the Chat tab's adapter picker loads them",
    "ADAPTER_DIR": "each tab's run picker sets it (Train: the adapter STAGE=dpo/kto continues)",
    "PROMPT": "the Chat tab's message box",
    "INTERACTIVE": "the Chat tab is the interactive mode",
    "INPUT_FILE": "predict-file: the Evaluate tab generates on a file",
    "OUTPUT_FILE": "predict-file: the Evaluate tab writes its report",
    "PREDICTIONS": "evaluate --predictions: CLI",
    "REPLACE_DATA": "make data's; the UI never replaces a data file",
    "DEMO_MINUTES": "make demo's",
}
# Left blank unless set: the tool decides them (TIER=auto, or OUTPUT_DIR from MODEL_NAME and METHOD).
DECIDED: set[Setting] = set(TIERED) - {"QUANT_LEVEL", "GRADIENT_CHECKPOINTING"} | {"OUTPUT_DIR"}


def settings_of(tab: str) -> list[Setting]:
    """The settings a tab's form holds, in the config tree's order."""
    variables = Config.variables()
    wanted: set[Setting] = set()
    for command in TAB_COMMANDS[tab]:
        for item in COMMANDS[command].reads:  # a setting's name, or a [section] of them
            wanted |= {item} if is_setting(item) else {v for v, (sec, _) in variables.items() if sec == item}
    return [v for v in variables if v in wanted and v not in NOT_IN_UI]


def _kind(var: Setting) -> Any:
    sec, f = Config.variables()[var]
    return field_type(sec, f.name)


class Form:
    """One tab's settings as components (``self.fields``: VARIABLE -> component), built in the current Blocks."""

    def __init__(self, tab: str, cfg: Config, custom: dict[Setting, Any] | None = None):
        self.tab, self.cfg = tab, cfg
        # gradio components: Any, as each kind declares its own events (.change, .upload) and gradio's base has none
        self.fields: dict[Setting, Any] = {}
        custom = custom or {}
        names = settings_of(tab)
        main = [v for v in MAIN[tab] if v in names]
        for var in main:
            self.fields[var] = custom[var]() if var in custom else self._component(var)
        rest = [v for v in names if v not in main]
        if rest:
            with gr.Accordion("Advanced settings", open=False, elem_id=f"{tab}-advanced"):
                for section in dict.fromkeys(Config.variables()[v][0] for v in rest):
                    with gr.Accordion(section, open=False, elem_id=f"{tab}-section-{section}"):
                        for var in (v for v in rest if Config.variables()[v][0] == section):
                            self.fields[var] = custom[var]() if var in custom else self._component(var)

    def initial(self, var: Setting) -> Any:
        """What the form shows at first: the value in force, or blank for a decided setting not set."""
        if var in DECIDED and var not in self.cfg.explicit:
            return ""
        value = self.cfg.get(var)
        kind = _kind(var)
        return value if kind in (bool, int, float) else show(value)

    def _component(self, var: Setting) -> gr.components.Component:
        sec, f = Config.variables()[var]
        label, info, kind = var, f.metadata["help"], _kind(var)
        info += f" (must be {bounds(var)})" if bounds(var) else ""  # the range Config.validate checks
        value, elem = self.initial(var), f"{self.tab}-{var}"
        if var in DECIDED and var not in self.cfg.explicit:  # a text box, so that blank (the tool decides) is a value
            info += " (blank: " + ("TIER=auto decides" if var in TIERED else "models/<model>-<method>") + ")"
            return gr.Textbox(value="", label=label, info=info, elem_id=elem, max_lines=1)
        if choices(var):
            return gr.Dropdown(list(choices(var) or ()), value=value, label=label, info=info, elem_id=elem)
        if kind is bool:
            return gr.Checkbox(value=value, label=label, info=info, elem_id=elem)
        if kind in (int, float):
            return gr.Number(value=value, label=label, info=info, precision=0 if kind is int else None, elem_id=elem)
        return gr.Textbox(value=value, label=label, info=info, elem_id=elem, max_lines=1)

    def components(self) -> list[gr.components.Component]:
        return list(self.fields.values())

    def _same(self, var: Setting, text: str) -> bool:
        """The form's text means the value in force (a browser sends 3 for NUM_EPOCHS=3.0)."""
        try:
            return parse_value(text, _kind(var), var) == self.cfg.get(var)
        except ConfigError:
            return False  # passed on: the command line names the problem

    def overrides(self, values: list[Any]) -> dict[str, str]:
        """The form's values (in components() order) as the KEY=value arguments that differ from what the command
        would use anyway; a blank decided setting is left to the tool."""
        out: dict[str, str] = {}  # KEY=value arguments, as the commands take them
        for var, value in zip(self.fields, values, strict=True):
            if value is None or (isinstance(value, str) and not value.strip() and var in DECIDED):
                continue
            if _kind(var) is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            text = show(value)
            if var in DECIDED and var not in self.cfg.explicit or not self._same(var, text):
                out[var] = text
        return out


def command_line(command: str, overrides: dict[str, str], python: str = "python") -> str:
    """The line a user pastes into a terminal (in the project dir) to do what the UI does."""
    return " ".join([python, "-m", "app", command, *(shlex.quote(f"{k}={v}") for k, v in overrides.items())])


def argv(command: str, overrides: dict[str, str]) -> list[str]:
    """The same command line as argv for the UI's subprocess: this interpreter, `-m app`."""
    return [sys.executable, "-m", "app", command, *(f"{k}={v}" for k, v in overrides.items())]


def named(fn: Callable[..., Any], leading: list[str], form: Form | None = None) -> Callable[..., Any]:
    """``fn`` (taking ``leading`` inputs, then the form's values) with a signature naming each input, so that the
    UI's API (gradio_client, /docs) takes ``model_name=..., max_steps=...`` instead of param_0, param_1, ..."""
    names = leading + [v.lower() for v in (form.fields if form else ())]
    if inspect.isgeneratorfunction(fn):

        def wrapper(*args: Any) -> Any:
            yield from fn(*args)
    else:

        def wrapper(*args: Any) -> Any:
            return fn(*args)

    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    wrapper.__name__ = fn.__name__
    return wrapper
