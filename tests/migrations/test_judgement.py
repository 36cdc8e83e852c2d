"""Judgement without a database: each case is a statement that was misjudged before (issue 9).

Every migration here runs after one that created `t1` (full, in production) with a primary key,
so `t1` is an existing table, as it is when an old migration made it.
"""

from __future__ import annotations

from pathlib import Path

from changeover.migrations import commands
from changeover.migrations.formats import script
from changeover.migrations.lint import LintContext, ScriptAnalysis, analyze

BASE = ("CREATE TABLE t1 (id bigint PRIMARY KEY, a int, payload text, note text DEFAULT 'n', email text);\n"
        "CREATE TABLE parent (id bigint PRIMARY KEY);\n"
        "CREATE MATERIALIZED VIEW mv AS SELECT id FROM t1;\n")


def run(tmp_path: Path, sql: str, *, threshold: int = 10_000) -> ScriptAnalysis:
    ctx = LintContext(backfill_threshold=threshold)
    base = tmp_path / "0001_base.up.sql"
    base.write_text(BASE)
    analyze(script(base), ctx)
    p = tmp_path / "0002_case.up.sql"
    p.write_text(sql)
    return analyze(script(p), ctx)


def rules(a: ScriptAnalysis) -> set[str]:
    return {f.rule for f in a.findings if not f.ignored}


# -- 1. nothing unjudged ----------------------------------------------------------------------------
def test_statements_that_were_expand_are_judged(tmp_path: Path) -> None:
    cases = {
        "TRUNCATE t1;": ("truncating-table", "ACCESS EXCLUSIVE"),
        "LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE;": ("locking-table", "ACCESS EXCLUSIVE"),
        "VACUUM FULL t1;": ("table-rewrite", "ACCESS EXCLUSIVE"),
        "CLUSTER t1 USING t1_pkey;": ("table-rewrite", "ACCESS EXCLUSIVE"),
        "REFRESH MATERIALIZED VIEW mv;": ("refresh-matview-not-concurrent", "ACCESS EXCLUSIVE"),
        "ALTER TABLE t1 SET UNLOGGED;": ("table-rewrite", "ACCESS EXCLUSIVE"),
        "ALTER TABLE t1 SET LOGGED;": ("table-rewrite", "ACCESS EXCLUSIVE"),
    }
    for sql, (rule, lock) in cases.items():
        a = run(tmp_path, sql)
        assert a.phase == "unsafe" and rule in rules(a), (sql, a.findings)
        assert a.statements[0].lock == lock, sql
    assert run(tmp_path, "ALTER TABLE t1 SET UNLOGGED;").statements[0].rewrites


def test_an_unmodelled_statement_is_unjudged_until_confirmed(tmp_path: Path) -> None:
    a = run(tmp_path, "CREATE RULE r AS ON INSERT TO t1 DO INSTEAD NOTHING;")
    f = next(f for f in a.findings if f.rule == "unjudged")
    assert a.phase == "unsafe" and "changeover cannot judge this statement" in f.message
    assert "-- changeover:ignore unjudged" in f.message
    ok = run(tmp_path, "-- changeover:ignore unjudged t1 is written only by the batch job\n"
                       "CREATE RULE r AS ON INSERT TO t1 DO INSTEAD NOTHING;")
    assert ok.phase == "expand" and not ok.errors


def test_unknown_alter_table_action_is_unjudged(tmp_path: Path) -> None:
    a = run(tmp_path, "ALTER TABLE t1 DETACH PARTITION t1_2020;")
    assert "unjudged" in rules(a) and a.statements[0].lock == "unknown"


def test_do_block_is_judged_by_what_it_runs(tmp_path: Path) -> None:
    a = run(tmp_path, "DO $$\nBEGIN\n  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE column_name = 'x')"
                      " THEN\n    ALTER TABLE t1 ALTER COLUMN a TYPE bigint;\n  END IF;\nEND $$;")
    s = a.statements[0]
    assert "changing-column-type" in rules(a) and s.lock == "ACCESS EXCLUSIVE" and s.rewrites
    assert (a.findings[0].line, s.kind) == (1, "Do")
    literal = run(tmp_path, "DO $$ BEGIN EXECUTE 'TRUNCATE t1'; END $$;")
    assert "truncating-table" in rules(literal)
    harmless = run(tmp_path, "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'mood') THEN "
                             "CREATE TYPE mood AS ENUM ('ok'); END IF; END $$;")
    assert harmless.phase == "expand" and not harmless.findings


def test_do_block_with_computed_sql_is_unjudged(tmp_path: Path) -> None:
    a = run(tmp_path, "DO $$ BEGIN EXECUTE format('ALTER TABLE %I ADD COLUMN y int', 't1'); END $$;")
    assert "unjudged" in rules(a) and "EXECUTE of a computed string" in a.findings[0].message
    other = run(tmp_path, "DO LANGUAGE plperl $$ 1; $$;")
    assert "unjudged" in rules(other)


# -- 2. what makes a table new --------------------------------------------------------------------
def test_create_table_if_not_exists_does_not_make_the_table_new(tmp_path: Path) -> None:
    a = run(tmp_path, "CREATE TABLE IF NOT EXISTS t1 (id bigint PRIMARY KEY, a int, payload text);\n"
                      "ALTER TABLE t1 ALTER COLUMN a TYPE bigint;\nALTER TABLE t1 DROP COLUMN IF EXISTS payload;\n")
    assert {"changing-column-type", "dropping-column"} <= rules(a) and a.phase == "unsafe"


def test_types_declared_by_create_table_if_not_exists_are_not_known(tmp_path: Path) -> None:
    # Mattermost's pattern: the table may predate the migration with other column types, and the DO
    # block runs the ALTER exactly then (verified: a 200,000-row table whose column was text was
    # rewritten, new relfilenode). The declared varchar(1000) is not what the column is.
    ddl = "CREATE TABLE IF NOT EXISTS teams (id bigint PRIMARY KEY, domains varchar(1000));\n"
    for alter in ("ALTER TABLE teams ALTER COLUMN domains TYPE varchar(1000);",
                  "DO $$ BEGIN IF true THEN\n  ALTER TABLE teams ALTER COLUMN domains TYPE varchar(1000);\n"
                  "END IF; END $$;"):
        a = run(tmp_path, ddl + alter)
        assert "changing-column-type" in rules(a) and a.phase == "unsafe", (alter, a.findings)
    # a table this history created is known: IF NOT EXISTS there is a no-op and its types stay known
    known = run(tmp_path, "CREATE TABLE IF NOT EXISTS t1 (id bigint PRIMARY KEY, payload varchar(10));\n"
                          "ALTER TABLE t1 ALTER COLUMN payload TYPE text;")
    assert "changing-column-type" not in rules(known), known.findings


def test_types_added_by_add_column_if_not_exists_to_an_unknown_table_are_not_known(tmp_path: Path) -> None:
    # Mattermost 000018: the column may already exist there with another type, and then the ALTER rewrites
    a = run(tmp_path, "CREATE TABLE IF NOT EXISTS s (id bigint PRIMARY KEY);\n"
                      "ALTER TABLE s ADD COLUMN IF NOT EXISTS role varchar(64);\n"
                      "ALTER TABLE s ALTER COLUMN role TYPE varchar(64);")
    assert "changing-column-type" in rules(a), a.findings
    # on a table the history made, a column it never added does not exist: IF NOT EXISTS adds it
    known = run(tmp_path, "ALTER TABLE t1 ADD COLUMN IF NOT EXISTS b varchar(10);\n"
                          "ALTER TABLE t1 ALTER COLUMN b TYPE text;")
    assert "changing-column-type" not in rules(known), known.findings


def test_create_table_as_and_select_into_make_new_tables(tmp_path: Path) -> None:
    for create in ("CREATE TABLE t3 AS SELECT id, a FROM t1;", "SELECT id, a INTO t3 FROM t1;"):
        a = run(tmp_path, create + "\nCREATE INDEX t3_a ON t3 (a);\nALTER TABLE t3 ADD CONSTRAINT u UNIQUE (id);\n"
                "UPDATE t3 SET a = 0;")
        assert not a.errors and a.phase == "expand", (create, a.findings)


# -- 3. inline constraints ------------------------------------------------------------------------
def test_constraints_inside_add_column(tmp_path: Path) -> None:
    uniq = run(tmp_path, "ALTER TABLE t1 ADD COLUMN code text UNIQUE;")
    assert "unique-without-index" in rules(uniq) and uniq.phase == "unsafe"
    ref = run(tmp_path, "ALTER TABLE t1 ADD COLUMN parent_id bigint REFERENCES parent (id);")
    assert "constraint-missing-not-valid" in rules(ref) and ref.statements[0].tables == ["t1", "parent"]
    assert "SHARE ROW EXCLUSIVE on parent" in ref.findings[-1].message
    check = run(tmp_path, "ALTER TABLE t1 ADD COLUMN qty int CHECK (qty > 0);")
    assert "constraint-missing-not-valid" in rules(check)
    plain = run(tmp_path, "ALTER TABLE t1 ADD COLUMN qty int;")
    assert plain.phase == "expand" and not plain.findings


# -- 4. locks held until commit -------------------------------------------------------------------
def test_validate_in_the_same_migration_runs_under_the_strong_lock(tmp_path: Path) -> None:
    a = run(tmp_path, "ALTER TABLE t1 ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES parent (id) NOT VALID;\n"
                      "ALTER TABLE t1 VALIDATE CONSTRAINT fk;\n")
    f = next(f for f in a.findings if f.rule == "slow-under-held-lock")
    assert f.statement == 2 and "taken by statement 1" in f.message and "Split into two migrations" in f.recipe
    assert a.phase == "unsafe"
    assert [(h.table, h.lock, h.since, h.until) for h in a.held] == [
        ("t1", "SHARE ROW EXCLUSIVE", 1, 2), ("parent", "SHARE ROW EXCLUSIVE", 1, 2)]
    three = run(tmp_path, "ALTER TABLE t1 ADD CONSTRAINT nn CHECK (a IS NOT NULL) NOT VALID;\n"
                          "ALTER TABLE t1 VALIDATE CONSTRAINT nn;\nALTER TABLE t1 ALTER COLUMN a SET NOT NULL;\n")
    assert "slow-under-held-lock" in rules(three)
    assert [(h.lock, h.since, h.until) for h in three.held] == [("ACCESS EXCLUSIVE", 1, 3)]


def test_validate_alone_or_without_a_transaction_is_fine(tmp_path: Path) -> None:
    assert run(tmp_path, "ALTER TABLE t1 VALIDATE CONSTRAINT fk;").phase == "expand"
    a = run(tmp_path, "-- changeover:transaction off\n"
                      "ALTER TABLE t1 ADD CONSTRAINT c CHECK (a > 0) NOT VALID;\n"
                      "ALTER TABLE t1 VALIDATE CONSTRAINT c;\n")
    assert "slow-under-held-lock" not in rules(a) and a.phase == "expand"
    assert all(h.since == h.until for h in a.held)


def test_a_slow_statement_on_another_table_is_flagged_too(tmp_path: Path) -> None:
    a = run(tmp_path, "ALTER TABLE parent ADD COLUMN x int;\nALTER TABLE t1 VALIDATE CONSTRAINT c;\n")
    f = next(f for f in a.findings if f.rule == "slow-under-held-lock")
    assert "ACCESS EXCLUSIVE on parent" in f.message
    # a slow statement that is an error of its own gets that finding only (one thing to fix)
    own = run(tmp_path, "ALTER TABLE parent ADD COLUMN x int;\nUPDATE t1 SET note = 'x' WHERE note IS NULL;\n")
    assert [f.rule for f in own.findings] == ["unbatched-backfill"]


# -- 5. phases -------------------------------------------------------------------------------------
def test_backward_incompatible_changes_are_not_expand(tmp_path: Path) -> None:
    contract = {"ALTER TABLE t1 DROP CONSTRAINT t1_pkey;": "dropping-constraint",
                "ALTER TABLE t1 ALTER COLUMN note DROP DEFAULT;": "dropping-default",
                "DROP TRIGGER trg ON t1;": "dropping-object", "DROP FUNCTION f(int);": "dropping-object",
                "DROP VIEW v;": "dropping-object"}
    for sql, rule in contract.items():
        a = run(tmp_path, sql)
        assert a.phase == "contract" and rule in rules(a), sql
    for sql in ("ALTER VIEW v RENAME TO v2;", "ALTER FUNCTION f(int) RENAME TO g;",
                "ALTER TYPE mood RENAME VALUE 'ok' TO 'fine';", "ALTER TABLE t1 SET SCHEMA archive;"):
        a = run(tmp_path, sql)
        assert a.phase == "unsafe" and a.findings[0].recipe, sql


def test_dropping_the_check_that_set_not_null_used_is_expand(tmp_path: Path) -> None:
    a = run(tmp_path, "-- changeover:ignore slow-under-held-lock t1 is small\n"
                      "ALTER TABLE t1 ADD CONSTRAINT nn CHECK (a IS NOT NULL);\n"
                      "ALTER TABLE t1 ALTER COLUMN a SET NOT NULL;\n"
                      "ALTER TABLE t1 DROP CONSTRAINT nn;\n")
    assert "dropping-constraint" not in rules(a)


# -- 6. row counts without a database -------------------------------------------------------------
def test_one_row_change_by_key_is_a_notice(tmp_path: Path) -> None:
    a = run(tmp_path, "DELETE FROM t1 WHERE id = 5;\nUPDATE t1 SET note = 'x' WHERE id = 7 AND a = 1;\n")
    assert not a.errors and a.phase == "expand"
    assert [f.severity for f in a.findings] == ["notice", "notice"]
    assert run(tmp_path, "DELETE FROM t1 WHERE a = 5;").phase == "unsafe"


def test_backfill_directive_batches_delete(tmp_path: Path) -> None:
    a = run(tmp_path, "-- changeover:backfill table=t1 batch=500\nDELETE FROM t1 WHERE note IS NULL;\n")
    assert a.statements[0].backfill and not a.findings and a.phase == "expand"


def test_stable_function_default_is_not_volatile(tmp_path: Path) -> None:
    assert run(tmp_path, "ALTER TABLE t1 ADD COLUMN h text DEFAULT md5('x');").phase == "expand"
    assert run(tmp_path, "ALTER TABLE t1 ADD COLUMN h text DEFAULT my_random();").phase == "unsafe"


# -- 7. hygiene ------------------------------------------------------------------------------------
def test_hygiene_warnings(tmp_path: Path) -> None:
    long = "x" * 64
    a = run(tmp_path, f"CREATE TABLE t2 ({long} text, code char(2));\n"
                      "ALTER TABLE t1 ALTER COLUMN note TYPE varchar(20);\n"
                      "ALTER TABLE t1 ALTER COLUMN a TYPE timestamp "
                      "USING to_timestamp(a);\n")
    assert {"identifier-too-long", "prefer-text-over-char", "prefer-text", "prefer-timestamptz"} <= \
        {f.rule for f in a.findings if f.severity == "warning"}


def test_statements_that_cannot_run_in_a_transaction(tmp_path: Path) -> None:
    assert "transaction-incompatible" in rules(run(tmp_path, "VACUUM t1;"))
    assert "transaction-incompatible" in rules(run(tmp_path, "ALTER TABLE t1 ADD COLUMN y int;\nVACUUM ANALYZE t1;"))
    assert run(tmp_path, "-- changeover:transaction off\nVACUUM t1;").phase == "expand"
    assert run(tmp_path, "ANALYZE t1;").phase == "expand"


def test_down_scripts_are_linted(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "0001_a.up.sql").write_text("CREATE TABLE a (id bigint PRIMARY KEY, x text);\n")
    (d / "0001_a.down.sql").write_text("DROP TABLE a;\n")
    (d / "0002_b.up.sql").write_text("CREATE INDEX CONCURRENTLY a_x ON a (x);\n")
    (d / "0002_b.down.sql").write_text("DROP INDEX a_x;\n")
    res = commands.lint(None, [str(d)])
    f = next(f for f in res.findings if f.file.endswith("0002_b.down.sql"))
    assert f.rule == "drop-index-not-concurrent" and f.severity == "warning" and f.message.startswith("rollback:")
    assert res.ok and not any(f.file.endswith("0001_a.down.sql") for f in res.findings)  # a rollback drops
    (d / "0002_b.down.sql").write_text("DROP INDEX CONCURRENTLY;\n")
    broken = commands.lint(None, [str(d)])
    assert not broken.ok and broken.errors[0].rule == "parse-error" and broken.errors[0].file.endswith("down.sql")
