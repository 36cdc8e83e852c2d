"""What every `changeover` verb shares: the consoles, the -c/--json options, reading the config or
finding the daemon, and printing JSON or a time."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from changeover import config as config_mod
from changeover.config import Config

# Piped output is read by programs and people with wide windows: never wrap it at 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 400)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 400)

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="Path to changeover.toml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DEFAULT = Path(config_mod.DEFAULT_CONFIG)


def load(path: Path) -> Config:
    return config_mod.load(path)


def daemon_at(path: Path) -> config_mod.Location:
    """For the controls of a running daemon: found from the file's location, not its contents, so
    `status` and `rollback` work while changeover.toml is being edited (or broken)."""
    return config_mod.locate(path)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"
