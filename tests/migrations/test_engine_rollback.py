"""Rollback: what --to and --all mean, and every down script checked before anything is undone."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover.config import Config
from changeover.errors import LintFailed, MigrationError, UsageError
from changeover.migrations import commands

from .conftest import Project, add
from .test_engine import tables


def states(cfg: Config) -> dict[str, str]:
    return {m.version: m.state for m in commands.status(cfg).migrations}


def test_to_leaves_the_version_applied_and_all_undoes_version_zero(project: Project, any_db: str,
                                                                   tmp_path: Path) -> None:
    cfg = project(any_db)
    add(cfg, "00000000000000_init", "CREATE TABLE base (id bigint PRIMARY KEY);", "DROP TABLE base;")
    add(cfg, "20240101000000_a", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;")
    add(cfg, "20240102000000_b", "CREATE TABLE b (id bigint PRIMARY KEY);", "DROP TABLE b;")
    commands.up(cfg)
    res = commands.rollback(cfg, to="20240101000000")
    assert [s.name for s in res.rolled_back] == ["b"]
    res = commands.rollback(cfg, to="0")  # version 0 is applied: it stays
    assert [s.name for s in res.rolled_back] == ["a"]
    assert states(cfg)["00000000000000"] == "applied"
    res = commands.rollback(cfg, everything=True)
    assert [s.name for s in res.rolled_back] == ["init"]
    assert not {"base", "a", "b"} & tables(any_db, tmp_path)
    with pytest.raises(UsageError, match="one of --steps, --to and --all"):
        commands.rollback(cfg, to="0", everything=True)


def test_to_zero_without_a_version_zero_undoes_everything(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;")
    add(cfg, "0002_b", "CREATE TABLE b (id bigint PRIMARY KEY);", "DROP TABLE b;")
    commands.up(cfg)
    assert [s.name for s in commands.rollback(cfg, to="0").rolled_back] == ["b", "a"]


def test_a_broken_oldest_down_script_is_found_before_anything_is_undone(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;\nDROP TABEL oops;")
    for i in range(2, 9):
        add(cfg, f"000{i}_t{i}", f"CREATE TABLE t{i} (id bigint PRIMARY KEY);", f"DROP TABLE t{i};")
    commands.up(cfg)
    with pytest.raises(LintFailed, match=r"0001_a.down.sql:2:.*syntax error.*nothing was rolled back"):
        commands.rollback(cfg, to="0")
    assert set(states(cfg).values()) == {"applied"}


def test_data_loss_and_missing_down_scripts_are_refused_up_front(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);\nINSERT INTO a VALUES (1);", "DROP TABLE a;")
    add(cfg, "0002_b", "CREATE TABLE b (id bigint PRIMARY KEY);")
    add(cfg, "0003_c", "CREATE TABLE c (id bigint PRIMARY KEY);", "DROP TABLE c;")
    commands.up(cfg)
    with pytest.raises(MigrationError) as e:
        commands.rollback(cfg, to="0")
    assert "0002_b has no down script" in str(e.value)
    assert "rolling back 0001_a would destroy data (table a" in str(e.value)
    assert set(states(cfg).values()) == {"applied"}  # 0003_c was not undone either


def test_the_file_of_an_applied_migration_is_gone(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;")
    add(cfg, "0002_b", "CREATE TABLE b (id bigint PRIMARY KEY);", "DROP TABLE b;")
    commands.up(cfg)
    for f in (cfg.root / "migrations").glob("0001_*"):
        f.unlink()
    with pytest.raises(MigrationError, match=r"0001_a is applied but its file is gone from .*migrations"):
        commands.rollback(cfg, to="0")
    assert states(cfg)["0002"] == "applied"
