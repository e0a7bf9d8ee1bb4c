"""The user's settings: one typed tree whose fields are the Makefile / .env / KEY=value variables,
loaded and validated in one place (settings.py). Everything above this layer reads a Config."""
from app.config.fields import ALL, DEFAULT_MODEL, TIERED, ConfigError
from app.config.settings import (OTHER_PREFIXES, OTHER_VARIABLES, Config, default_output_dir, documented, make_overrides,
                                 parse_cli_overrides, show)

__all__ = ["ALL", "DEFAULT_MODEL", "OTHER_PREFIXES", "OTHER_VARIABLES", "TIERED", "Config", "ConfigError",
           "default_output_dir", "documented", "make_overrides", "parse_cli_overrides", "show"]
