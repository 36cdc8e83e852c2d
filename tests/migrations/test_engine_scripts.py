"""What a script means: transaction control as psql reads it, dirty non-transactional migrations,
errors that keep the server's DETAIL and HINT, and migrations out of order or gone."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from changeover.errors import MigrationError, UsageError
from changeover.migrations import commands
from changeover.migrations.formats import discover

from .conftest import PG_ADMIN, Project, add
from .test_engine import tables


@pytest.fixture
def other_db() -> Iterator[str]:
    name = f"co_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def contents(url: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(url) as c:
        names = [r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                         "AND tablename <> 'changeover_migrations'")]
        return {n: c.execute(f'SELECT * FROM "{n}" ORDER BY 1').fetchall() for n in names}


SCRIPTS = {
    "ends-in-rollback": "BEGIN;\nCREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\nROLLBACK;\n",
    "savepoints": "CREATE TABLE a (id int);\nBEGIN;\nINSERT INTO a VALUES (1);\nSAVEPOINT s;\n"
                  "INSERT INTO a VALUES (2);\nROLLBACK TO SAVEPOINT s;\nINSERT INTO a VALUES (3);\nCOMMIT;\n",
    "rollback-then-more": "CREATE TABLE a (id int);\nBEGIN;\nINSERT INTO a VALUES (1);\nROLLBACK;\n"
                          "INSERT INTO a VALUES (2);\n",
    "begin-commit": "START TRANSACTION;\nCREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\nEND;\n",
    "never-committed": "CREATE TABLE a (id int);\nBEGIN;\nINSERT INTO a VALUES (1);\n",
    "commit-and-chain": "BEGIN;\nCREATE TABLE a (id int);\nCOMMIT AND CHAIN;\nINSERT INTO a VALUES (1);\n"
                        "ROLLBACK;\n",
}


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs the psql client to compare with")
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_transaction_control_means_what_psql_makes_of_it(project: Project, pg_url: str, other_db: str,
                                                         tmp_path: Path, name: str) -> None:
    script = tmp_path / "script.sql"
    script.write_text(SCRIPTS[name])
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script), other_db], check=True,
                   capture_output=True)
    cfg = project(pg_url)
    add(cfg, "0001_script", SCRIPTS[name])
    res = commands.up(cfg)
    assert contents(pg_url) == contents(other_db)
    assert commands.status(cfg).migrations[0].state == "applied"
    undone = name in ("ends-in-rollback", "rollback-then-more", "never-committed", "commit-and-chain")
    assert bool(res.applied[0].notes) == undone and all("as psql would" in n for n in res.applied[0].notes)


def test_a_final_rollback_keeps_nothing_on_sqlite_too(project: Project) -> None:
    cfg = project("sqlite:///app.db")
    add(cfg, "0001_a", "CREATE TABLE keep (id INTEGER);\nBEGIN;\nCREATE TABLE gone (id INTEGER);\nROLLBACK;\n")
    commands.up(cfg)
    assert {"keep", "gone"} & tables("sqlite:///app.db", cfg.root) == {"keep"}


def test_two_phase_commit_is_refused(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "BEGIN;\nCREATE TABLE a (id int);\nPREPARE TRANSACTION 'x';\n")
    with pytest.raises(MigrationError, match=r"0001_a.up.sql:3:1: PREPARE TRANSACTION.*not supported"):
        commands.up(cfg)


# -- dirty ----------------------------------------------------------------------------------------
HALF = ("-- changeover:transaction off\nCREATE TABLE a (id bigint PRIMARY KEY);\n"
        "CREATE INDEX CONCURRENTLY a_missing ON a (missing);\n")


def test_a_half_run_migration_is_dirty_until_repair_decides(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_half", HALF)
    add(cfg, "0002_next", "CREATE TABLE b (id bigint PRIMARY KEY);")
    with pytest.raises(MigrationError, match=r"0001_half failed at .*statement 2.*statement 1 ran and stay; "
                                             r"the migration is recorded as dirty"):
        commands.up(cfg)
    st = commands.status(cfg)
    assert [m.state for m in st.migrations] == ["dirty", "pending"] and len(st.dirty) == 1
    assert st.migrations[0].failed is not None and "statement 2 (line 3) failed after statement 1 ran" in \
        st.migrations[0].failed and 'column "missing" does not exist' in st.migrations[0].failed
    with pytest.raises(MigrationError, match=r"0001_half is dirty .* nothing was run"):
        commands.up(cfg)
    with pytest.raises(MigrationError, match="is dirty"):
        commands.rollback(cfg)
    with pytest.raises(UsageError, match=r"--dirty applied.*--dirty pending"):
        commands.repair(cfg)
    # the user fixes the file so that it re-runs, and says none of it counts: pending again
    add(cfg, "0001_half", HALF.replace("CREATE TABLE a", "CREATE TABLE IF NOT EXISTS a").replace("(missing)", "(id)"))
    assert commands.repair(cfg, dirty="pending") == ["0001_half (dirty, now pending)"]
    assert [m.state for m in commands.status(cfg).migrations] == ["pending", "pending"]
    assert [s.name for s in commands.up(cfg).applied] == ["half", "next"]
    with pytest.raises(UsageError, match="no migration is dirty"):
        commands.repair(cfg, dirty="applied")


def test_repair_dirty_applied_records_the_fixed_file(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_half", HALF)
    with pytest.raises(MigrationError):
        commands.up(cfg)
    with psycopg.connect(pg_url) as c:  # the user finishes it by hand
        c.execute("CREATE INDEX a_missing ON a (id)")
    add(cfg, "0001_half", HALF.replace("(missing)", "(id)"))
    commands.repair(cfg, dirty="applied")
    st = commands.status(cfg).migrations[0]
    assert st.state == "applied" and not st.drifted and st.failed is None


def test_a_failed_rollback_midway_is_dirty(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, n int);\nCREATE INDEX a_n ON a (n);",
        "-- changeover:transaction off\nDROP INDEX CONCURRENTLY a_n;\nDROP TABLE nope;\n")
    commands.up(cfg)
    with pytest.raises(MigrationError, match=r"rollback of 0001_a failed .*statement 1 ran and stay.*dirty"):
        commands.rollback(cfg)
    st = commands.status(cfg).migrations[0]
    assert st.state == "dirty" and st.failed is not None and st.failed.startswith("down: statement 2")


# -- errors ---------------------------------------------------------------------------------------
def test_errors_keep_detail_and_hint(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_u", "CREATE TABLE u (id bigint PRIMARY KEY, email text);\n"
                       "INSERT INTO u VALUES (1, 'u5'), (2, 'u5');")
    commands.up(cfg)
    add(cfg, "0002_uniq", "CREATE UNIQUE INDEX u_email ON u (email);")
    with pytest.raises(MigrationError, match=r"0002_uniq failed .*DETAIL: Key \(email\)=\(u5\) is duplicated"):
        commands.up(cfg, allow_unsafe=True)
    add(cfg, "0002_uniq", "ALTER TABLE u ALTER COLUMN email TYPE int;")
    with pytest.raises(MigrationError, match=r'0002_uniq failed .*HINT: You might need to specify "USING email::'):
        commands.up(cfg, allow_unsafe=True)


def test_every_error_of_a_migration_names_it(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (n text);\nINSERT INTO a VALUES ('x');")
    add(cfg, "0002_b", "ALTER TABLE a ADD COLUMN m text;\n-- changeover:backfill table=a\nUPDATE a SET m = n;")
    with pytest.raises(MigrationError, match=r"^0002_b: backfill of a: it has no single-column primary key"):
        commands.up(cfg)


# -- order ----------------------------------------------------------------------------------------
def test_a_new_migration_older_than_the_newest_applied_is_refused(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    add(cfg, "0003_c", "CREATE TABLE c (id bigint PRIMARY KEY);")
    commands.up(cfg)
    add(cfg, "0002_b", "CREATE TABLE b (id bigint PRIMARY KEY);")  # merged from a branch, after 0003 ran
    add(cfg, "0004_d", "CREATE TABLE d (id bigint PRIMARY KEY);")
    with pytest.raises(MigrationError, match=r"pending but older than 0003_c.*out of order\): 0002_b — nothing "
                                             r"was run; pass --allow-out-of-order"):
        commands.safe(cfg)
    assert [m.state for m in commands.status(cfg).migrations] == ["applied", "pending", "applied", "pending"]
    assert [s.name for s in commands.safe(cfg, allow_out_of_order=True).applied] == ["b", "d"]


def test_an_applied_migration_whose_file_is_gone_is_refused(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    add(cfg, "0002_b", "CREATE TABLE b (id bigint PRIMARY KEY);")
    commands.up(cfg, "v1")
    (cfg.root / "migrations" / "0002_b.up.sql").unlink()
    add(cfg, "0003_c", "CREATE TABLE c (id bigint PRIMARY KEY);")
    with pytest.raises(MigrationError, match=r"applied but missing from .*migrations \(the default \[migrations\] "
                                             r"dir .*\): 0002_b \(release v1\)"):
        commands.up(cfg)
    assert commands.status(cfg).migrations[1].state == "missing"
    assert [s.name for s in commands.up(cfg, allow_out_of_order=True).applied] == ["c"]


def test_a_history_table_from_before_dirty_states_is_upgraded(project: Project, pg_url: str) -> None:
    with psycopg.connect(pg_url) as c:  # the table as earlier versions created it, with one row
        c.execute("CREATE TABLE changeover_migrations (version text PRIMARY KEY, name text NOT NULL, phase text "
                  "NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), duration_ms "
                  "bigint NOT NULL DEFAULT 0, release text, state text NOT NULL DEFAULT 'applied', "
                  "backfill_position text)")
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    commands.up(cfg)
    checksum = discover(cfg.root / "migrations")[0].checksum
    with psycopg.connect(pg_url) as c:
        c.execute("DELETE FROM changeover_migrations")
        c.execute("ALTER TABLE changeover_migrations DROP COLUMN failed")
        c.execute("INSERT INTO changeover_migrations (version, name, phase, checksum) VALUES ('0001', 'a', "
                  "'expand', %s)", (checksum,))
    assert commands.status(cfg).migrations[0].state == "applied"   # read without the new column
    add(cfg, "0002_half", HALF.replace("TABLE a", "TABLE a2").replace("ON a", "ON a2"))
    with pytest.raises(MigrationError, match="recorded as dirty"):
        commands.up(cfg)                                          # the column is added, then used
    assert commands.status(cfg).migrations[1].state == "dirty"
