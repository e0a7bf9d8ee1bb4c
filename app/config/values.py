"""How a setting's value is written (command line, .env) and read back into its field's type."""

from __future__ import annotations

import types
import typing
from typing import Any

from app.config.fields import ALL, ConfigError


def show(value: Any) -> str:
    """A value as it is written on the command line / in .env (the inverse of parse_value)."""
    if value is None:
        return ALL
    if isinstance(value, list):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_value(raw: Any, hint: Any, var: str) -> Any:
    """Convert a string (or an already-typed value) to the field's annotated type."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # e.g. int | None, where None is written "all" (or left empty)
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if optional and (raw is None or str(raw).strip().lower() in ("", ALL)):
        return None
    origin = typing.get_origin(hint)
    try:
        if origin is list:
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return [str(x).strip() for x in items if str(x).strip()]
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on", "y"):
                return True
            if s in ("0", "false", "no", "off", "n", ""):
                return False
            raise ValueError
        if hint is int:
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            return int(str(raw).strip())
        if hint is float:
            return float(str(raw).strip())
        return str(raw)
    except (ValueError, TypeError):
        kind = {bool: "true/false", int: "a whole number", float: "a number"}.get(hint, str(hint))
        kind += f" or {ALL!r}" if optional else ""
        raise ConfigError([f"{var}={raw!r} is not {kind}; fix the value in the command, env or .env"]) from None
