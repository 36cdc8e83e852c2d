"""Flyway's file names read as they are, and adopting an existing database with a baseline."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from changeover.errors import MigrationError, UsageError
from changeover.migrations import commands
from changeover.migrations.formats import discover, norm, version_key

from .conftest import Project
from .test_engine import tables


def flyway(d: Path) -> None:
    (d / "V1__init.sql").write_text("CREATE TABLE a (id bigint PRIMARY KEY);\n")
    (d / "U1__init.sql").write_text("DROP TABLE a;\n")
    (d / "V1.1__b.sql").write_text("CREATE TABLE b (id bigint PRIMARY KEY);\n")
    (d / "U1.1__b.sql").write_text("DROP TABLE b;\n")
    (d / "V1.10__c.sql").write_text("CREATE TABLE c (id bigint PRIMARY KEY);\n")
    (d / "V1_9__d.sql").write_text("CREATE TABLE d (id bigint PRIMARY KEY);\n")


def test_versions_compare_as_dotted_numbers() -> None:
    assert version_key("1.10") > version_key("1.9") > version_key("1") and version_key("0001") == (1,)
    assert norm("01.002") == "1.2" and norm("00000000000000") == "0"


def test_flyway_files(project: Project, any_db: str, tmp_path: Path) -> None:
    cfg = project(any_db)
    flyway(tmp_path / "migrations")
    ms = discover(tmp_path / "migrations")
    assert [(m.version, m.name, m.format, m.down is not None) for m in ms] == [
        ("1", "init", "flyway", True), ("1.1", "b", "flyway", True), ("1.9", "d", "flyway", False),
        ("1.10", "c", "flyway", False)]
    assert [s.version for s in commands.up(cfg).applied] == ["1", "1.1", "1.9", "1.10"]
    assert {"a", "b", "c", "d"} <= tables(any_db, tmp_path)
    with pytest.raises(MigrationError, match=r"1\.10_c has no down script"):
        commands.rollback(cfg)
    (tmp_path / "migrations" / "V1.10__c.sql").write_text("CREATE TABLE c (id bigint PRIMARY KEY);\n-- ok\n")
    with pytest.raises(MigrationError, match=r"V1.10__c.sql: changed after it was applied"):
        commands.up(cfg)


def test_flyway_undo_without_its_version_and_repeatables_are_errors(tmp_path: Path) -> None:
    (tmp_path / "U2__x.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"U2__x.sql: has no matching V2__x.sql"):
        discover(tmp_path)
    (tmp_path / "U2__x.sql").unlink()
    (tmp_path / "R__views.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"repeatable migrations \(R__\) are not supported"):
        discover(tmp_path)


def test_new_follows_the_flyway_layout(project: Project, tmp_path: Path) -> None:
    cfg = project("sqlite:///app.db")
    flyway(tmp_path / "migrations")
    assert [f.name for f in commands.new(cfg, "more")] == ["V2__more.sql", "U2__more.sql"]


def test_baseline_adopts_an_existing_database(project: Project, pg_url: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_url) as c:  # a database that was migrated by another tool
        c.execute("CREATE TABLE a (id bigint PRIMARY KEY); CREATE TABLE b (id bigint PRIMARY KEY)")
    cfg = project(pg_url)
    flyway(tmp_path / "migrations")
    with pytest.raises(UsageError, match=r"no migration in .* is at or before version 0\.5"):
        commands.baseline(cfg, "0.5")
    assert commands.baseline(cfg, "1.1", release="v7") == ["1_init", "1.1_b"]
    st = commands.status(cfg)
    assert [(m.version, m.state) for m in st.migrations] == [("1", "applied"), ("1.1", "applied"),
                                                             ("1.9", "pending"), ("1.10", "pending")]
    assert st.migrations[0].release == "v7"
    assert [s.version for s in commands.up(cfg).applied] == ["1.9", "1.10"]   # CREATE TABLE a never ran again
    with pytest.raises(MigrationError, match="baseline only adopts a database without changeover history"):
        commands.baseline(cfg, "1.1")
