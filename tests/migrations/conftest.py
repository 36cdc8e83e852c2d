"""Fixtures: a fresh PostgreSQL database per test, a project directory with changeover.toml."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from changeover import config as config_mod
from changeover.config import Config

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"co_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def write_config(root: Path, database: str, extra: str = "") -> Path:
    (root / "migrations").mkdir(exist_ok=True)
    path = root / "changeover.toml"
    path.write_text(f'[app]\ncommand = ["true"]\n\n[migrations]\ndatabase = "{database}"\n'
                    f'lock_timeout = "200ms"\nbackoff = "10ms"\nretries = 3\n{extra}')
    return path


Project = Callable[..., Config]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """project(database, extra_toml) -> Config; migrations go in tmp_path/migrations."""

    def make(database: str, extra: str = "") -> Config:
        return config_mod.load(write_config(tmp_path, database, extra), environ={})

    return make


def add(cfg: Config, name: str, up: str, down: str | None = None) -> None:
    """A native-format migration: name like '0001_create_users'."""
    d = cfg.root / cfg.migrations.dir
    (d / f"{name}.up.sql").write_text(up)
    if down is not None:
        (d / f"{name}.down.sql").write_text(down)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest) -> str:
    """Both engines: the SQLite file lives in the project directory."""
    if request.param == "sqlite":
        return "sqlite:///app.db"
    return str(request.getfixturevalue("pg_url"))
