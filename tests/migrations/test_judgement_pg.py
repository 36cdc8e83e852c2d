"""Judgement checked on a real PostgreSQL: the lock the linter reports is the one PostgreSQL takes
(pg_locks, inside the statement's transaction), a rewrite is a new relfilenode, and `plan`,
`lint --database` and the runner act on what the database holds (issue 9)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from changeover.migrations import commands
from changeover.migrations.cli import app
from changeover.migrations.formats import script
from changeover.migrations.lint import LintContext, analyze

from .conftest import Project, add

SETUP = """
CREATE TABLE parent (id bigint PRIMARY KEY);
CREATE TABLE t (id bigint PRIMARY KEY, a int, b text DEFAULT 'x', CONSTRAINT a_pos CHECK (a > 0) NOT VALID);
INSERT INTO parent SELECT g FROM generate_series(1, 10) g;
INSERT INTO t SELECT g, g, 'v' FROM generate_series(1, 100) g;
CREATE MATERIALIZED VIEW mv AS SELECT id FROM t;
CREATE UNIQUE INDEX mv_id ON mv (id);
"""
MODES = {"AccessShareLock": "ACCESS SHARE", "RowShareLock": "ROW SHARE", "RowExclusiveLock": "ROW EXCLUSIVE",
         "ShareUpdateExclusiveLock": "SHARE UPDATE EXCLUSIVE", "ShareLock": "SHARE",
         "ShareRowExclusiveLock": "SHARE ROW EXCLUSIVE", "ExclusiveLock": "EXCLUSIVE",
         "AccessExclusiveLock": "ACCESS EXCLUSIVE"}
RANK = list(MODES.values())

# statement -> (table whose lock is compared, rewrites?)
CASES = {
    "TRUNCATE t": ("t", False),   # a new, empty file: nothing is copied
    "LOCK TABLE t IN SHARE MODE": ("t", False),
    "CLUSTER t USING t_pkey": ("t", True),
    "REFRESH MATERIALIZED VIEW mv": ("mv", True),
    "REFRESH MATERIALIZED VIEW CONCURRENTLY mv": ("mv", False),
    "ALTER TABLE t SET UNLOGGED": ("t", True),
    "ALTER TABLE t ADD COLUMN code text UNIQUE": ("t", False),
    "ALTER TABLE t ADD COLUMN parent_id bigint REFERENCES parent (id)": ("t", False),
    "ALTER TABLE t ADD COLUMN qty int CHECK (qty > 0)": ("t", False),
    "ALTER TABLE t DROP CONSTRAINT a_pos": ("t", False),
    "ALTER TABLE t ALTER COLUMN b DROP DEFAULT": ("t", False),
    "ALTER TABLE t VALIDATE CONSTRAINT a_pos": ("t", False),
    "ALTER TABLE t SET (fillfactor = 70)": ("t", False),
    "ALTER TABLE t ENABLE TRIGGER ALL": ("t", False),
    "COMMENT ON TABLE t IS 'orders'": ("t", False),
    "DO $$ BEGIN ALTER TABLE t ALTER COLUMN a TYPE bigint; END $$": ("t", True),
    "ALTER TABLE t ADD COLUMN h text DEFAULT md5('x')": ("t", False),
}


def _strongest(conn: psycopg.Connection[tuple[object, ...]], table: str) -> str:
    rows = conn.execute("SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND relation = to_regclass(%s)",
                        (table,)).fetchall()
    return max((MODES[r[0]] for r in rows if r[0] in MODES), key=RANK.index, default="none")


def _filenode(conn: psycopg.Connection[tuple[object, ...]], table: str) -> object:
    return conn.execute("SELECT pg_relation_filenode(to_regclass(%s))", (table,)).fetchone()


@pytest.mark.parametrize("sql", sorted(CASES))
def test_reported_lock_and_rewrite_are_postgresql_s(pg_url: str, tmp_path: Path, sql: str) -> None:
    table, rewrites = CASES[sql]
    ctx = LintContext()
    (tmp_path / "0001_setup.up.sql").write_text(SETUP)
    analyze(script(tmp_path / "0001_setup.up.sql"), ctx)
    (tmp_path / "0002_case.up.sql").write_text(sql + ";\n")
    plan = analyze(script(tmp_path / "0002_case.up.sql"), ctx).statements[0]
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(SETUP)
        before = _filenode(c, table)
        c.execute("BEGIN")
        c.execute(sql)
        taken, after = _strongest(c, table), _filenode(c, table)
        c.execute("ROLLBACK")
    assert plan.lock == taken, f"{sql}: linter says {plan.lock}, PostgreSQL took {taken}"
    assert plan.rewrites == rewrites, sql
    assert rewrites == (before != after) or sql.startswith("TRUNCATE"), sql


def test_inline_references_locks_the_parent_share_row_exclusive(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(SETUP)
        c.execute("BEGIN")
        c.execute("ALTER TABLE t ADD COLUMN parent_id bigint REFERENCES parent (id)")
        assert _strongest(c, "parent") == "SHARE ROW EXCLUSIVE"
        c.execute("ROLLBACK")


def test_drop_constraint_breaks_old_code_on_conflict(pg_url: str) -> None:
    """Why DROP CONSTRAINT is contract: the running code's upsert fails once the unique index is gone."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE u (email text CONSTRAINT u_email UNIQUE)")
        c.execute("INSERT INTO u VALUES ('a') ON CONFLICT (email) DO NOTHING")
        c.execute("ALTER TABLE u DROP CONSTRAINT u_email")
        with pytest.raises(psycopg.errors.InvalidColumnReference):
            c.execute("INSERT INTO u VALUES ('a') ON CONFLICT (email) DO NOTHING")


def _seed(pg_url: str, sql: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(sql)


def test_truncate_is_not_applied_by_safe(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_t2", "CREATE TABLE t2 (id bigint PRIMARY KEY);\nINSERT INTO t2 VALUES (1), (2);")
    add(cfg, "0002_truncate", "TRUNCATE t2;")
    res = commands.safe(cfg)
    assert res.stopped_at is not None and res.stopped_at.version == "0002"
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM t2").fetchone() == (2,)


def test_create_table_if_not_exists_over_a_full_table(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    _seed(pg_url, "CREATE TABLE t1 (id bigint PRIMARY KEY, a int, payload text);"
                  "INSERT INTO t1 SELECT g, g, 'p' FROM generate_series(1, 50) g; ANALYZE t1;")
    add(cfg, "0001_t1", "CREATE TABLE IF NOT EXISTS t1 (id bigint PRIMARY KEY, a int, payload text);\n"
                        "ALTER TABLE t1 ALTER COLUMN a TYPE bigint;\nALTER TABLE t1 DROP COLUMN IF EXISTS payload;\n")
    p = commands.plan(cfg).pending[0]
    assert p.action == "refuse" and {"changing-column-type", "dropping-column"} <= {f.rule for f in p.analysis.errors
                                                                                   + p.analysis.findings}
    assert commands.safe(cfg).stopped_at is not None
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(payload) FROM t1").fetchone() == (50,)


def test_plan_on_a_fresh_database_needs_no_allow_unsafe(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_items", "CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, sku text);")
    add(cfg, "0002_items_sku", "CREATE INDEX items_sku ON items (sku);\n"
                               "ALTER TABLE items ADD COLUMN uid uuid NOT NULL DEFAULT gen_random_uuid();")
    plan = commands.plan(cfg)
    assert [p.action for p in plan.pending] == ["apply", "apply"]
    second = plan.pending[1].analysis
    assert not second.errors and {f.severity for f in second.findings} == {"notice"}
    assert "items is created earlier in this run" in second.findings[0].message
    assert not commands.lint(None, [str(cfg.root / "migrations")]).ok  # without the database: errors


def test_lock_findings_on_an_empty_table_are_notices(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_orders", "CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint);\n"
                            "CREATE TABLE empty (id bigint PRIMARY KEY, user_id bigint);")
    commands.up(cfg)
    _seed(pg_url, "INSERT INTO orders SELECT g, g FROM generate_series(1, 100) g; ANALYZE orders;")
    add(cfg, "0002_idx", "CREATE INDEX orders_user ON orders (user_id);")
    add(cfg, "0003_idx", "CREATE INDEX empty_user ON empty (user_id);")
    plan = commands.plan(cfg)
    full, empty = (p.analysis for p in plan.pending)
    assert full.phase == "unsafe" and full.errors[0].rule == "index-not-concurrent"
    assert empty.phase == "expand" and "empty is empty" in empty.findings[0].message
    doc = plan.to_json()["pending"]
    assert doc[0]["tables"] == [{"table": "orders", "exists": True, "rows": 100, "bytes": doc[0]["tables"][0]["bytes"]}]


def test_unbatched_backfill_by_row_estimate(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_big", "CREATE TABLE big (id bigint PRIMARY KEY, a int, note text);")
    commands.up(cfg)
    _seed(pg_url, "INSERT INTO big SELECT g, g % 1000, NULL FROM generate_series(1, 20000) g; ANALYZE big;")
    add(cfg, "0002_fix_some", "UPDATE big SET note = 'x' WHERE a = 7;")
    add(cfg, "0003_fix_all", "UPDATE big SET note = 'x';")
    few, every = (p.analysis for p in commands.plan(cfg).pending)
    assert few.phase == "expand" and few.findings[0].severity == "notice" and "by EXPLAIN" in few.findings[0].message
    assert every.phase == "unsafe" and "~20,000 rows by EXPLAIN" in every.errors[0].message


def test_backfill_threshold_is_configurable(project: Project, pg_url: str) -> None:
    cfg = project(pg_url, "backfill_threshold = 10\n")
    assert cfg.migrations.backfill_threshold == 10
    add(cfg, "0001_t", "CREATE TABLE t (id bigint PRIMARY KEY, a int);")
    commands.up(cfg)
    _seed(pg_url, "INSERT INTO t SELECT g, g FROM generate_series(1, 50) g; ANALYZE t;")
    add(cfg, "0002_fix", "UPDATE t SET a = 0 WHERE a < 20;")
    a = commands.plan(cfg).pending[0].analysis
    assert a.phase == "unsafe" and " rows by EXPLAIN)" in a.errors[0].message


def test_backfill_directive_deletes_in_batches(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_t", "CREATE TABLE t (id bigint PRIMARY KEY, gone boolean);\n"
                       "INSERT INTO t SELECT g, g % 2 = 0 FROM generate_series(1, 25) g;")
    add(cfg, "0002_prune", "-- changeover:backfill table=t batch=10\nDELETE FROM t WHERE gone;")
    res = commands.up(cfg)
    assert res.applied[-1].backfilled_rows == 12
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*), bool_or(gone) FROM t").fetchone() == (13, False)


def test_function_volatility_comes_from_pg_proc(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_t", "CREATE TABLE t (id bigint PRIMARY KEY);\n"
                       "CREATE FUNCTION fixed() RETURNS text IMMUTABLE LANGUAGE sql AS $$ SELECT 'x' $$;\n"
                       "CREATE FUNCTION roll() RETURNS float VOLATILE LANGUAGE sql AS $$ SELECT random() $$;\n"
                       "INSERT INTO t VALUES (1);")
    commands.up(cfg)
    add(cfg, "0002_a", "ALTER TABLE t ADD COLUMN f text DEFAULT fixed();")
    add(cfg, "0003_b", "ALTER TABLE t ADD COLUMN r float DEFAULT roll();")
    fixed, roll = (p.analysis.phase for p in commands.plan(cfg).pending)
    assert (fixed, roll) == ("expand", "unsafe")


def test_plan_shows_locks_held_until_commit(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_t", "CREATE TABLE t (id bigint PRIMARY KEY, a int);")
    commands.up(cfg)
    _seed(pg_url, "INSERT INTO t SELECT g, g FROM generate_series(1, 10) g; ANALYZE t;")
    add(cfg, "0002_check", "ALTER TABLE t ADD CONSTRAINT a_pos CHECK (a > 0) NOT VALID;\n"
                           "ALTER TABLE t VALIDATE CONSTRAINT a_pos;\n")
    r = CliRunner().invoke(app, ["plan", "-c", str(cfg.file)])
    assert "holds ACCESS EXCLUSIVE on t (blocks reads and writes) from line 1: statements 1-2, until the commit" \
        in r.stdout
    assert "error [slow-under-held-lock]" in r.stdout and "table t: ~10 rows" in r.stdout
    doc = json.loads(CliRunner().invoke(app, ["plan", "--json", "-c", str(cfg.file)]).stdout)
    assert doc["pending"][0]["locks"][0] | {"line": 1} == {
        "table": "t", "lock": "ACCESS EXCLUSIVE", "blocks": "reads and writes", "since_statement": 1, "line": 1,
        "until_statement": 2, "statements": 2}


def test_lint_with_database(project: Project, pg_url: str, tmp_path: Path) -> None:
    cfg = project(pg_url)
    _seed(pg_url, "CREATE TABLE empty (id bigint PRIMARY KEY, x text);")
    (tmp_path / "one.sql").write_text("CREATE INDEX empty_x ON empty (x);\n")
    offline = CliRunner().invoke(app, ["lint", str(tmp_path / "one.sql"), "-c", str(tmp_path / "none.toml")])
    assert offline.exit_code == 1
    online = CliRunner().invoke(app, ["lint", "--database", pg_url, str(tmp_path / "one.sql"), "-c",
                                      str(tmp_path / "none.toml")])
    assert online.exit_code == 0 and "notice [index-not-concurrent]" in online.stdout
    configured = CliRunner().invoke(app, ["lint", "--database", "config", str(tmp_path / "one.sql"), "-c",
                                          str(cfg.file)])
    assert configured.exit_code == 0, configured.stdout
