"""Build a ChecksConfig from TOML text, as changeover.toml's [checks] would be read."""

from __future__ import annotations

import tomllib

from changeover.checks import config as checks_config
from changeover.checks.config import ChecksConfig
from changeover.tables import Table


def checks(text: str) -> ChecksConfig:
    """`text` is the content under [checks], written with full table names ([checks.pre] ...)."""
    raw = tomllib.loads(text)
    return checks_config.load(Table("changeover.toml", "checks", raw.get("checks", {})), {})
