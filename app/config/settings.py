"""One typed config tree (the sections are in app.config.fields). Every field is a Makefile /
.env / CLI variable.

The field name, upper-cased, *is* the variable name (``max_seq_len`` <-> ``MAX_SEQ_LEN``),
so the Makefile, ``.env.template``, ``--help`` and the saved ``train_config.json`` all
follow from these dataclasses and cannot drift apart.

Precedence, highest first: CLI ``KEY=value`` > process environment > ``.env`` > default.
This module imports only the standard library (python-dotenv lazily), so ``make help``
works before the virtualenv exists.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

from app.config.checks import cross_field_problems
from app.config.fields import (
    ALL,
    TIERED,
    ConfigError,
    DataArgs,
    DistArgs,
    EvalArgs,
    LoraArgs,
    ModelArgs,
    PredictArgs,
    ResourceArgs,
    ServeArgs,
    TrainArgs,
    WebuiArgs,
)
from app.config.setting_names import Setting
from app.config.setting_sources import adapter_base, default_output_dir, make_overrides, read_dotenv, unknown_problem
from app.config.values import parse_value


class SettingNames(frozenset[Setting]):
    """Config.explicit: the names the user set. ``in`` takes a setting's name only, so that mypy flags a misspelt
    one (``"MAX_SEQ_LENN" in cfg.explicit``), which a plain frozenset would answer False to, silently."""

    def __contains__(self, name: Setting) -> bool:  # type: ignore[override]  # narrower than object: on purpose
        return frozenset.__contains__(self, name)


@dataclass(frozen=True)
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    resources: ResourceArgs = field(default_factory=ResourceArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    distributed: DistArgs = field(default_factory=DistArgs)
    predict: PredictArgs = field(default_factory=PredictArgs)
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    serve: ServeArgs = field(default_factory=ServeArgs)
    webui: WebuiArgs = field(default_factory=WebuiArgs)
    explicit: SettingNames = field(
        default_factory=SettingNames,
        repr=False,
        compare=False,
        metadata={"help": "not a setting: names the user set explicitly"},
    )

    # ---- introspection -------------------------------------------------------------
    @classmethod
    def variables(cls) -> dict[Setting, tuple[str, dataclasses.Field]]:
        """VARIABLE -> (section, field) for every setting (the same dict each call: do not change it)."""
        return _variables()

    def get(self, var: Setting) -> Any:
        sec, f = self.variables()[cast(Setting, var.upper())]  # untyped callers may give "lora_r"
        return getattr(getattr(self, sec), f.name)

    def replace(self, values: Mapping[Setting, Any], explicit: Iterable[Setting] = ()) -> Config:
        """A new Config with these VARIABLE values (parsed as from the command line; a bad one is a
        ConfigError), and ``explicit`` added to the names treated as set by the user. A Config is
        never changed: the tier, the memory fit, the guard and a resume each make a new one."""
        known = self.variables()
        by_sec: dict[str, dict[str, Any]] = {}
        for var, raw in values.items():
            sec, f = known[cast(Setting, var.upper())]
            by_sec.setdefault(sec, {})[f.name] = parse_value(raw, field_type(sec, f.name), var.upper())
        sections = {sec: dataclasses.replace(getattr(self, sec), **vals) for sec, vals in by_sec.items()}
        names = SettingNames(self.explicit | {cast(Setting, v.upper()) for v in explicit})
        return dataclasses.replace(self, **sections, explicit=names)

    def to_dict(self) -> dict[Setting, Any]:
        return {var: self.get(var) for var in self.variables()}

    def save(self, path: str | Path) -> None:
        from app.core.atomic import write_json

        write_json(path, self.to_dict())

    # ---- loading ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        overrides: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        dotenv_path: str | Path | None = ".env",
        validate: bool = True,
    ) -> Config:
        """Defaults < .env < environment < overrides. Raises ConfigError listing every problem.

        ``validate=False``: unknown names and unparsable values still raise, but the range checks
        are left to the caller: the CLI's pre-flight, which reports them together with the data's
        and the model's problems (app.cli.preflight). Either way a Config is validated once.

        Every key must name a setting, however it was given: a ``KEY=value`` argument, a line of
        ``.env``, or an assignment on the ``make`` command line (make passes those through the
        environment, where a misspelt name would otherwise vanish among the shell's variables; make
        lists them in MAKEFLAGS). ``.env`` and make may also hold the names docker compose, the
        Makefile and the ML libraries read (OTHER_VARIABLES, OTHER_PREFIXES).
        """
        env = dict(os.environ) if env is None else env
        dotenv = read_dotenv(dotenv_path)
        layers: list[dict[str, Any]] = [dotenv, env, overrides or {}]
        known = cls.variables()
        problems = [p for p in (unknown_problem(k, f"in {dotenv_path}", known) for k in dotenv) if p]
        problems += [
            p for p in (unknown_problem(k, "on the make command line", known) for k in make_overrides(env)) if p
        ]
        problems += [p for p in (unknown_problem(k, None, known) for k in layers[2]) if p]
        values: dict[Setting, Any] = {}  # the variables the user set, in any layer (tiers and predict defer to them)
        for layer in layers:
            for key, raw in layer.items():
                var = key.upper()
                if not is_setting(var):
                    continue  # reported above where it matters; the environment holds plenty else
                sec, f = known[var]
                try:
                    values[var] = parse_value(raw, field_type(sec, f.name), var)
                except ConfigError as e:
                    problems.extend(e.problems)
        cfg = cls().replace(values, explicit=values)
        if not cfg.train.output_dir.strip():  # derived once, here, and saved with the run
            model = cfg.model.model_name  # STAGE=dpo/kto continuing ADAPTER_DIR trains on that adapter's base
            if cfg.train.stage != "sft" and cfg.predict.adapter_dir.strip() and "MODEL_NAME" not in cfg.explicit:
                model = adapter_base(cfg.predict.adapter_dir) or model
            cfg = cfg.replace(
                {
                    "OUTPUT_DIR": default_output_dir(
                        model, cfg.lora.method, cfg.data.data_path, DataArgs().data_path, cfg.train.stage
                    )
                }
            )
        if problems or validate:  # range problems of the parsable values too: all at once
            try:
                cfg.validate()
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Mapping[Setting, Any]) -> Config:
        """Build from plain values (a notebook, or a saved train_config.json)."""
        return cls.load(overrides={k: v for k, v in values.items()}, env={}, dotenv_path=None)

    # ---- validation ------------------------------------------------------------------
    def validate(self) -> Config:
        """Check every value; raise one ConfigError naming *all* bad variables and their fixes."""
        p: list[str] = []
        for var, (sec, f) in self.variables().items():  # each field's own words and range (app.config.fields)
            allowed, value = choices(var), self.get(var)
            if allowed and value not in allowed:
                p.append(f"{var}={value!r} is not one of {', '.join(allowed)}")
            rng = f.metadata.get("range")
            problem = rng and rng.problem(var, value, _whole(field_type(sec, f.name)))
            if problem:
                p.append(problem)

        p += cross_field_problems(self)
        if p:
            raise ConfigError(p)
        return self

    @classmethod
    def help_text(cls) -> str:
        lines, section = [], None
        for sec, var, shown, help_, choices in documented():
            if sec != section:
                lines.append(f"[{sec}]")
                section = sec
            extra = f" [{'|'.join(choices)}]" if choices else f" (must be {bounds(var)})" if bounds(var) else ""
            tiered = (
                " (unset, TIER=auto decides it from RAM/VRAM: `make info` shows the value)" if var in TIERED else ""
            )
            lines.append(f"  {var:<24} = {shown!s:<22} {help_}{extra}{tiered}")
        return "\n".join(lines)


def is_setting(name: str) -> TypeGuard[Setting]:
    """Whether ``name`` (upper case) is a setting's: a name read from the user, checked, is a ``Setting``."""
    return name in _variables()


def choices(var: Setting) -> tuple[str, ...] | None:
    """The allowed values of a setting whose type is a Literal (app.config.fields), else None."""
    sec, f = Config.variables()[var]
    hint = field_type(sec, f.name)
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def bounds(var: Setting) -> str | None:
    """What a number setting must be, as --help, the docs and the web UI show it ('>= 1', 'in [0, 1)',
    'in 1..65535'), else None; Config.validate checks it."""
    sec, f = Config.variables()[var]
    rng = f.metadata.get("range")
    return rng.text(_whole(field_type(sec, f.name))) if rng else None


def _whole(hint: Any) -> bool:
    """Whether a field holds whole numbers (int, or int | None)."""
    return hint is int or int in typing.get_args(hint)


def documented() -> Iterator[tuple[str, Setting, Any, str, tuple[str, ...] | None]]:
    """(section, VARIABLE, default as shown, help, choices) for every setting, in order."""
    for var, (sec, f) in Config.variables().items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else ALL if default is None else default
        yield sec, var, shown, f.metadata["help"], choices(var)


_NAMES_DOC = '''"""Every setting's name, as a type: mypy flags a misspelt one where a ``Setting`` is expected
(``cfg.get("MAX_SEQ_LENN")``, ``"MAX_SEQ_LENN" in cfg.explicit``, ``cfg.replace({...})``, the Plan's decisions).

Generated from app/config/fields.py by `.venv/bin/python -m app docs`; do not edit (tests/config/test_docs.py
fails while it differs from what that writes).
"""
'''


def setting_names_source() -> str:
    """The text of app/config/setting_names.py: the ``Setting`` Literal of every setting's name, in order."""
    names = "".join(f'    "{var}",\n' for var in Config.variables())
    return f"{_NAMES_DOC}\nfrom typing import Literal\n\nSetting = Literal[\n{names}]\n"


def _sections(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "explicit"]


@functools.cache
def _variables() -> dict[Setting, tuple[str, dataclasses.Field]]:
    out: dict[Setting, tuple[str, dataclasses.Field]] = {}
    for sec in _sections(Config):
        assert sec.default_factory is not dataclasses.MISSING  # each section is field(default_factory=<its class>)
        for f in dataclasses.fields(sec.default_factory()):
            out[cast(Setting, f.name.upper())] = (sec.name, f)  # setting_names_source() lists these
    return out


@functools.cache
def field_type(section: str, name: str) -> Any:
    """The resolved annotation of ``Config.<section>.<name>`` (what parse_value converts a raw value to)."""
    sec_cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(sec_cls)[name]
