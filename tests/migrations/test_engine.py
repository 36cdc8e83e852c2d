"""The engine against real databases: formats, atomicity, drift, locks, retries, backfill resume."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path

import psycopg
import pytest

from changeover.config import Config
from changeover.errors import ChecksumMismatch, LintFailed, MigrationError, MigrationLockHeld, UsageError
from changeover.migrations import commands
from changeover.migrations.db import database
from changeover.migrations.lock import runner_lock

from .conftest import Project, add


def tables(url: str, root: Path) -> set[str]:
    db = database(url, root)
    conn = db.connect()
    try:
        if conn.pg:
            rows = conn.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        else:
            rows = conn.query("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows}
    finally:
        conn.close()


def write_formats(root: Path) -> None:
    d = root / "migrations"
    (d / "0001_users.up.sql").write_text("CREATE TABLE users (id bigint PRIMARY KEY, email text);\n")
    (d / "0001_users.down.sql").write_text("DROP TABLE users;\n")
    diesel = d / "2024-01-02-000000_orders"
    diesel.mkdir()
    (diesel / "up.sql").write_text("CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint);\n")
    (diesel / "down.sql").write_text("DROP TABLE orders;\n")
    (d / "20240103000000_items.sql").write_text(
        "-- migrate:up\nCREATE TABLE items (id bigint PRIMARY KEY);\n\n-- migrate:down\nDROP TABLE items;\n")


def test_all_three_formats(project: Project, any_db: str, tmp_path: Path) -> None:
    cfg = project(any_db)
    write_formats(tmp_path)
    res = commands.up(cfg, "r1")
    assert [s.name for s in res.applied] == ["users", "orders", "items"]
    assert {"users", "orders", "items"} <= tables(any_db, tmp_path)
    back = commands.rollback(cfg, steps=2)
    assert [s.name for s in back.rolled_back] == ["items", "orders"]
    assert "orders" not in tables(any_db, tmp_path)
    assert [m.state for m in commands.status(cfg).migrations] == ["applied", "pending", "pending"]


def test_failing_migration_leaves_nothing(project: Project, any_db: str, tmp_path: Path) -> None:
    cfg = project(any_db)
    add(cfg, "0001_ok", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;")
    add(cfg, "0002_bad", "CREATE TABLE b (id bigint PRIMARY KEY);\nINSERT INTO nope VALUES (1);", "DROP TABLE b;")
    with pytest.raises(MigrationError, match=r"0002_bad failed at .*0002_bad.up.sql:2:1 \(statement 2\)"):
        commands.up(cfg)
    assert "b" not in tables(any_db, tmp_path)
    assert [m.state for m in commands.status(cfg).migrations] == ["applied", "pending"]


def test_failing_rollback_leaves_migration_applied(project: Project, any_db: str, tmp_path: Path) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);\nCREATE TABLE a2 (id bigint);",
        "DROP TABLE a2;\nDROP TABLE missing_table;")
    commands.up(cfg)
    with pytest.raises(MigrationError, match=r"rollback of 0001_a failed .*statement 2"):
        commands.rollback(cfg)
    assert {"a", "a2"} <= tables(any_db, tmp_path)  # DROP TABLE a2 was rolled back too
    assert commands.status(cfg).migrations[0].state == "applied"


def test_checksum_drift_refused_then_repaired(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;")
    commands.up(cfg)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, x text);")
    add(cfg, "0002_b", "CREATE TABLE b (id bigint PRIMARY KEY);")
    with pytest.raises(ChecksumMismatch, match=r"0001_a\.up\.sql: changed after it was applied"):
        commands.safe(cfg)
    assert commands.status(cfg).migrations[0].drifted
    assert commands.repair(cfg) == ["0001_a"]
    assert [s.name for s in commands.safe(cfg).applied] == ["b"]


def test_safe_stops_before_contract_and_contract_needs_old_release_gone(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, old text);")
    add(cfg, "0002_add", "ALTER TABLE a ADD COLUMN new text;")
    add(cfg, "0003_drop", "-- changeover:phase contract\nALTER TABLE a DROP COLUMN old;")
    add(cfg, "0004_more", "ALTER TABLE a ADD COLUMN more text;")
    res = commands.safe(cfg, "v2")
    assert [s.version for s in res.applied] == ["0001", "0002"]
    assert res.stopped_at is not None and res.stopped_at.version == "0003"
    assert "after the old code is gone" in res.stopped_at.reason and res.pending == 2
    with pytest.raises(MigrationError, match="older release is still live"):
        commands.contract(cfg, older_release_live=True)
    with pytest.raises(MigrationError, match="--force"):
        commands.contract(cfg, older_release_live=None)
    res = commands.contract(cfg, "v2", older_release_live=lambda: False)
    assert [s.version for s in res.applied] == ["0003", "0004"]


def test_up_refuses_unsafe_before_applying_anything(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, n text);\nCREATE INDEX a_n ON a (n);\n"
                       "INSERT INTO a VALUES (1, 'x');")   # not empty: an index build blocks writers
    commands.up(cfg)
    add(cfg, "0003_ok", "ALTER TABLE a ADD COLUMN m text;")
    add(cfg, "0004_idx", "CREATE INDEX a_m ON a (m);")
    with pytest.raises(LintFailed, match=r"0004_idx is unsafe .*0004_idx.up.sql:1:1 \[index-not-concurrent\]"):
        commands.up(cfg)
    assert len(commands.status(cfg).pending) == 2
    assert len(commands.up(cfg, allow_unsafe=True).applied) == 2


def test_parse_error_refused_with_position(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);\nALTER TABLE a ADD COLUMN;\n")
    with pytest.raises(LintFailed, match=r"0001_a.up.sql:2:25: syntax error"):
        commands.up(cfg)


def test_rollback_data_loss_needs_flag(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);", "DROP TABLE a;")
    add(cfg, "0002_rows", "INSERT INTO a (id) VALUES (1);", "-- the rows stay")
    add(cfg, "0003_col", "ALTER TABLE a ADD COLUMN note text;", "ALTER TABLE a DROP COLUMN note;")
    commands.up(cfg)
    assert len(commands.rollback(cfg).rolled_back) == 1  # the column is empty: nothing lost
    commands.up(cfg)
    with pytest.raises(UsageError):
        commands.rollback(cfg, steps=1, to="1")
    with pytest.raises(UsageError, match="not applied"):
        commands.rollback(cfg, to="7")
    res = commands.rollback(cfg, to="1")
    assert [s.version for s in res.rolled_back] == ["0003", "0002"]
    with pytest.raises(MigrationError, match=r"destroy data \(table a"):
        commands.rollback(cfg)
    assert len(commands.rollback(cfg, allow_data_loss=True).rolled_back) == 1


def _down_destroys(cfg: Config, down: str, lost: str) -> None:
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, note text);", "DROP TABLE a;")
    add(cfg, "0002_rows", "INSERT INTO a (id, note) VALUES (1, 'ok');", "DELETE FROM a WHERE id = 1;")
    add(cfg, "0003_x", "ALTER TABLE a ADD COLUMN extra int;", f"ALTER TABLE a DROP COLUMN extra;\n{down}")
    commands.up(cfg)
    with pytest.raises(MigrationError, match=re.escape(lost)):
        commands.rollback(cfg)
    assert len(commands.rollback(cfg, allow_data_loss=True).rolled_back) == 1
    # A DELETE with a WHERE clause removes what its up script added: no flag needed.
    assert len(commands.rollback(cfg).rolled_back) == 1


def test_rollback_sees_rows_a_delete_without_where_destroys(project: Project, any_db: str) -> None:
    _down_destroys(project(any_db), "DELETE FROM a;", "rows of a (DELETE without WHERE)")


@pytest.mark.parametrize("down,lost", [  # PostgreSQL only: SQLite has neither
    ("TRUNCATE a;", "rows of a (TRUNCATE)"),
    ("ALTER TABLE a ALTER COLUMN note TYPE varchar(2);", "values of a.note (converted to another type)"),
])
def test_rollback_sees_truncate_and_type_changes(project: Project, pg_url: str, down: str, lost: str) -> None:
    _down_destroys(project(pg_url), down, lost)


def test_rollback_sees_a_dropped_schema_with_rows(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_s", "CREATE SCHEMA s; CREATE TABLE s.t (id bigint PRIMARY KEY); CREATE TABLE s.empty (id int);",
        "DROP SCHEMA s CASCADE;")
    add(cfg, "0002_rows", "INSERT INTO s.t VALUES (1);", "-- the rows stay")
    commands.up(cfg)
    commands.rollback(cfg)
    with pytest.raises(MigrationError, match=r"schema s \(tables with rows: s\.t\)"):
        commands.rollback(cfg)


def test_missing_down_script(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    commands.up(cfg)
    with pytest.raises(MigrationError, match="has no down script"):
        commands.rollback(cfg)


def test_runner_lock_two_runners(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    db = database(any_db, cfg.root)
    done: list[object] = []
    with runner_lock(db):
        with pytest.raises(MigrationLockHeld, match=r"another migration run holds the lock \(pid \d+.*host .*since"):
            commands.up(cfg)
        t = threading.Thread(target=lambda: done.append(commands.up(cfg, wait=True)))
        t.start()
        time.sleep(0.5)
        assert not done  # still waiting for us
    t.join(10)
    assert done and len(done[0].applied) == 1  # type: ignore[attr-defined]


def test_concurrent_runners_apply_once(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    for i in range(1, 6):
        add(cfg, f"000{i}_t{i}", f"CREATE TABLE t{i} (id bigint PRIMARY KEY);\nSELECT pg_sleep(0.05);")
    results: list[object] = []

    def run() -> None:
        results.append(commands.up(cfg, wait=True))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(len(r.applied) for r in results) == [0, 0, 5]  # type: ignore[attr-defined]


def test_lock_timeout_retry_while_another_session_holds_a_lock(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    commands.up(cfg)
    add(cfg, "0002_col", "ALTER TABLE a ADD COLUMN n text;")
    blocker = psycopg.connect(pg_url)
    blocker.execute("SELECT * FROM a")  # an open transaction holding ACCESS SHARE on a
    threading.Timer(0.5, blocker.rollback).start()
    messages: list[str] = []
    res = commands.up(cfg, progress=messages.append)
    blocker.close()
    assert res.applied[0].attempts >= 2
    assert any("0002_col: lock timeout (attempt 1/4), retrying" in m for m in messages)


def test_lock_timeout_gives_up_after_retries(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY);")
    commands.up(cfg)
    add(cfg, "0002_col", "ALTER TABLE a ADD COLUMN n text;")
    if any_db.startswith("postgres"):
        blocker = psycopg.connect(any_db)
        blocker.execute("SELECT * FROM a")
    else:
        lite = sqlite3.connect(str(cfg.root / "app.db"), isolation_level=None)
        lite.execute("BEGIN IMMEDIATE")
    messages: list[str] = []
    with pytest.raises(MigrationError, match="0002_col: could not get its lock after 4 attempts"):
        commands.up(cfg, progress=messages.append)
    assert len([m for m in messages if "lock timeout" in m]) == 3
    if any_db.startswith("postgres"):
        blocker.close()
    else:
        lite.close()
    assert [m.state for m in commands.status(cfg).migrations] == ["applied", "pending"]


def test_failed_concurrent_index_is_dropped(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, code text);\nINSERT INTO a VALUES (1, 'x'), (2, 'x');")
    commands.up(cfg)
    add(cfg, "0002_uniq", "CREATE UNIQUE INDEX CONCURRENTLY a_code ON a (code);")
    with pytest.raises(MigrationError, match=r"0002_uniq failed .*could not create unique index"):
        commands.up(cfg)
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM pg_class WHERE relname = 'a_code'").fetchone() == (0,)
        c.execute("DELETE FROM a WHERE id = 2")
        c.commit()
        c.execute("CREATE UNIQUE INDEX a_code ON a (code)")  # a leftover from a "crashed" run ...
        c.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'a_code'::regclass")
        c.commit()
    messages: list[str] = []
    res = commands.up(cfg, progress=messages.append)  # ... is dropped before the build
    assert res.applied[0].transaction is False
    assert any("INVALID index" in m for m in messages)


def test_backfill_in_batches_resumes_after_interruption(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, n text);\n"
                       "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 2500) "
                       "INSERT INTO a (id) SELECT i FROM s;")
    commands.up(cfg)
    add(cfg, "0002_m", "ALTER TABLE a ADD COLUMN m text;\n"
                       "-- changeover:backfill table=a batch=1000\nUPDATE a SET m = 'v' || id WHERE m IS NULL;")

    class Stop(Exception):
        pass

    def interrupt(msg: str) -> None:
        if "in 1 batches" in msg:
            raise Stop

    with pytest.raises(Stop):
        commands.up(cfg, "r2", progress=interrupt)
    st = commands.status(cfg).migrations[1]
    assert st.state == "backfilling"
    res = commands.safe(cfg, "r2")
    assert res.applied[0].backfilled_rows == 1500
    assert commands.status(cfg).migrations[1].state == "applied"
    conn = database(any_db, cfg.root).connect()
    assert conn.query("SELECT count(*) FROM a WHERE m IS NULL OR m <> 'v' || id")[0][0] == 0
    conn.close()


def test_backfill_needs_a_key(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "CREATE TABLE a (n text);\nINSERT INTO a VALUES ('x');")
    add(cfg, "0002_b", "ALTER TABLE a ADD COLUMN m text;\n-- changeover:backfill table=a\nUPDATE a SET m = n;")
    with pytest.raises(MigrationError, match="no single-column primary key"):
        commands.up(cfg)


def test_bad_directives_and_names(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "-- changeover:phase later\nSELECT 1;")
    with pytest.raises(MigrationError, match=r"0001_a.up.sql:1:1: changeover:phase expects expand or contract"):
        commands.status(cfg)
    add(cfg, "0001_a", "-- changeover:ignore index-not-concurrent\nSELECT 1;")
    with pytest.raises(MigrationError, match="a rule id and a reason"):
        commands.plan(cfg)
    (cfg.root / "migrations" / "0001_a.up.sql").unlink()
    (cfg.root / "migrations" / "notes.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="cannot tell the version"):
        commands.status(cfg)


def test_new_migration_follows_layout(project: Project, any_db: str) -> None:
    cfg = project(any_db)
    files = commands.new(cfg, "Add orders")
    assert [f.name for f in files] == ["0001_add_orders.up.sql", "0001_add_orders.down.sql"]
    assert [f.name for f in commands.new(cfg, "more")] == ["0002_more.up.sql", "0002_more.down.sql"]
    with pytest.raises(UsageError):
        commands.new(cfg, "bad/name")


def test_unsupported_url_and_missing_database(project: Project) -> None:
    with pytest.raises(MigrationError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h/db'"):
        commands.status(project("mysql://u:secret@h/db"))


def test_explicit_begin_commit_in_file_keeps_atomicity(project: Project, any_db: str, tmp_path: Path) -> None:
    cfg = project(any_db)
    add(cfg, "0001_a", "BEGIN;\nCREATE TABLE a (id bigint PRIMARY KEY);\nCOMMIT;\nINSERT INTO nope VALUES (1);")
    with pytest.raises(MigrationError, match="0001_a failed"):
        commands.up(cfg)
    assert "a" not in tables(any_db, tmp_path)


def test_sqlite_in_missing_directory_is_a_clear_error(project: Project) -> None:
    cfg = project("sqlite:///nodir/app.db")
    add(cfg, "0001_a", "CREATE TABLE a (id INTEGER PRIMARY KEY);")
    with pytest.raises(MigrationError, match=r"nodir/app.db: directory .* does not exist"):
        commands.up(cfg)
    with pytest.raises(MigrationError, match=r"nodir/app.db: directory .* does not exist"):
        commands.status(cfg)


def test_transaction_off_failure_says_what_ran(project: Project, pg_url: str, tmp_path: Path) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_a", "-- changeover:transaction off\nCREATE TABLE a (id bigint PRIMARY KEY);\n"
                       "INSERT INTO nope VALUES (1);")
    with pytest.raises(MigrationError, match=r"statement 1 ran and stay; the migration is recorded as dirty"):
        commands.up(cfg)
    assert "a" in tables(pg_url, tmp_path)
    st = commands.status(cfg).migrations[0]
    assert st.state == "dirty" and st.failed is not None and "statement 2 (line 3) failed" in st.failed
