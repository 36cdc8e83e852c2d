"""[migrations] settings: named defaults, typed values, errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover.errors import ConfigError
from changeover.migrations import config as mc


def load(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> mc.MigrationsConfig:
    p = tmp_path / "changeover.toml"
    p.write_text(f'[app]\ncommand = ["true"]\n\n[migrations]\n{body}')
    return config_mod.load(p, environ={} if environ is None else environ).migrations


def test_defaults_come_from_named_constants(tmp_path: Path) -> None:
    cfg = load(tmp_path, "", {"DATABASE_URL": "postgresql://app:pw@db/shop"})
    assert cfg.database == "postgresql://app:pw@db/shop" and cfg.dir == mc.DEFAULT_DIR
    assert cfg.lock_timeout == mc.DEFAULT_LOCK_TIMEOUT == 0.5
    assert (cfg.retries, cfg.backoff, cfg.batch_size) == (mc.DEFAULT_RETRIES, mc.DEFAULT_BACKOFF,
                                                          mc.DEFAULT_BATCH_SIZE)
    assert load(tmp_path, "").database is None


def test_values_are_typed(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'database = "sqlite:///x.db"\nlock_timeout = "2s"\nbatch_pause = "50ms"\nretries = 0\n')
    assert (cfg.lock_timeout, cfg.batch_pause, cfg.retries) == (2.0, 0.05, 0)


@pytest.mark.parametrize(("body", "message"), [
    ('lock_timeout = "soon"', "migrations.lock_timeout: expected a duration"),
    ("retries = -1", "migrations.retries: expected an integer >= 0"),
    ("batch_size = 0", "migrations.batch_size: expected an integer >= 1"),
    ('table = "drop table x"', "migrations.table: expected a plain SQL identifier"),
    ('lock_timout = "1s"', "migrations.lock_timout: unknown key (did you mean 'lock_timeout'?)"),
])
def test_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, body + "\n")


def test_dir_placeholder_and_explicitness(tmp_path: Path) -> None:
    assert not load(tmp_path, "").dir_explicit
    cfg = load(tmp_path, 'dir = "{release}/migrations"\n')
    assert cfg.dir_explicit and cfg.per_release
    with pytest.raises(ConfigError, match=re.escape("migrations.dir: expected a path where the only placeholder is "
                                                    "{release}, got a string '{version}/migrations'")):
        load(tmp_path, 'dir = "{version}/migrations"\n')
    with pytest.raises(ConfigError, match=re.escape("migrations.dir: expected a directory")):
        load(tmp_path, 'dir = ""\n')
