"""The user's settings: one typed tree whose fields are the Makefile / .env / KEY=value variables,
loaded and validated in one place (settings.py). Everything above this layer reads a Config."""

from app.config.fields import ALL, DEFAULT_MODEL, TIERED, ConfigError
from app.config.setting_names import Setting
from app.config.setting_sources import (
    OTHER_PREFIXES,
    OTHER_VARIABLES,
    default_output_dir,
    make_overrides,
    parse_cli_overrides,
)
from app.config.settings import (
    Config,
    SettingNames,
    bounds,
    choices,
    documented,
    is_setting,
    setting_names_source,
)
from app.config.values import show

__all__ = [
    "ALL",
    "DEFAULT_MODEL",
    "OTHER_PREFIXES",
    "OTHER_VARIABLES",
    "TIERED",
    "Config",
    "ConfigError",
    "Setting",
    "SettingNames",
    "bounds",
    "choices",
    "default_output_dir",
    "documented",
    "is_setting",
    "make_overrides",
    "parse_cli_overrides",
    "setting_names_source",
    "show",
]
