"""The user's settings: one typed tree whose fields are the Makefile / .env / KEY=value variables,
loaded and validated in one place (settings.py). Everything above this layer reads a Config."""

from app.config.fields import ALL, DEFAULT_MODEL, TIERED, ConfigError
from app.config.setting_sources import (
    OTHER_PREFIXES,
    OTHER_VARIABLES,
    default_output_dir,
    make_overrides,
    parse_cli_overrides,
)
from app.config.settings import Config, choices, documented, show

__all__ = [
    "ALL",
    "DEFAULT_MODEL",
    "OTHER_PREFIXES",
    "OTHER_VARIABLES",
    "TIERED",
    "Config",
    "ConfigError",
    "choices",
    "default_output_dir",
    "documented",
    "make_overrides",
    "parse_cli_overrides",
    "show",
]
