"""Every lint rule: one statement that triggers it and one close variant that must not."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover.migrations.formats import script
from changeover.migrations.lint import LintContext, ScriptAnalysis, analyze
from changeover.migrations.rules import RULES

EXISTING = "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric, note varchar(50), user_id bigint);\n"

# rule -> (triggers it, does not). Each runs after a migration that created `orders`.
CASES: dict[str, tuple[str, str]] = {
    "adding-volatile-default": ("ALTER TABLE orders ADD COLUMN uid uuid DEFAULT gen_random_uuid();",
                                "ALTER TABLE orders ADD COLUMN created timestamptz DEFAULT now();"),
    "adding-serial-column": ("ALTER TABLE orders ADD COLUMN seq bigserial;",
                             "ALTER TABLE orders ADD COLUMN seq bigint;"),
    "adding-stored-generated-column": (
        "ALTER TABLE orders ADD COLUMN t2 numeric GENERATED ALWAYS AS (total * 2) STORED;",
        "ALTER TABLE orders ADD COLUMN t2 numeric;"),
    "changing-column-type": ("ALTER TABLE orders ALTER COLUMN total TYPE bigint;",
                             "ALTER TABLE orders ALTER COLUMN note TYPE varchar(100);"),
    "setting-not-null": (
        "ALTER TABLE orders ALTER COLUMN total SET NOT NULL;",
        "ALTER TABLE orders ADD CONSTRAINT total_nn CHECK (total IS NOT NULL) NOT VALID;\n"
        "ALTER TABLE orders VALIDATE CONSTRAINT total_nn;\nALTER TABLE orders ALTER COLUMN total SET NOT NULL;"),
    "index-not-concurrent": ("CREATE INDEX orders_user ON orders (user_id);",
                             "CREATE INDEX CONCURRENTLY orders_user ON orders (user_id);"),
    "drop-index-not-concurrent": ("DROP INDEX orders_user;", "DROP INDEX CONCURRENTLY orders_user;"),
    "reindex-not-concurrent": ("REINDEX INDEX orders_user;", "REINDEX INDEX CONCURRENTLY orders_user;"),
    "concurrently-in-transaction": ("BEGIN;\nCREATE INDEX CONCURRENTLY i ON orders (user_id);\nCOMMIT;",
                                    "CREATE INDEX CONCURRENTLY i ON orders (user_id);"),
    "constraint-missing-not-valid": (
        "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (user_id) REFERENCES users (id);",
        "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;"),
    "unique-without-index": ("ALTER TABLE orders ADD CONSTRAINT u UNIQUE (user_id);",
                             "ALTER TABLE orders ADD CONSTRAINT u UNIQUE USING INDEX orders_user_key;"),
    "exclusion-constraint": ("ALTER TABLE orders ADD CONSTRAINT ex EXCLUDE USING gist (user_id WITH =);",
                             "ALTER TABLE orders ADD CONSTRAINT c CHECK (total > 0) NOT VALID;"),
    "dropping-column": ("ALTER TABLE orders DROP COLUMN note;", "ALTER TABLE orders ADD COLUMN note2 text;"),
    "dropping-table": ("DROP TABLE orders;", "CREATE TABLE t (id bigint PRIMARY KEY);\nDROP TABLE t;"),
    "dropping-object": ("DROP VIEW orders_view;", "CREATE VIEW orders_view AS SELECT id FROM orders;"),
    "renaming-column": ("ALTER TABLE orders RENAME COLUMN note TO remark;",
                        "CREATE TABLE t (a text);\nALTER TABLE t RENAME COLUMN a TO b;"),
    "renaming-table": ("ALTER TABLE orders RENAME TO purchases;",
                       "CREATE TABLE t (a text);\nALTER TABLE t RENAME TO u;"),
    "adding-required-column": ("ALTER TABLE orders ADD COLUMN status text NOT NULL;",
                               "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';"),
    "unbatched-backfill": ("UPDATE orders SET note = 'x' WHERE note IS NULL;",
                           "-- changeover:backfill table=orders\nUPDATE orders SET note = 'x' WHERE note IS NULL;"),
    "backfill-without-update": ("-- changeover:backfill table=order\nUPDATE orders SET note = 'x' WHERE note IS NULL;",
                                "-- changeover:backfill table=public.orders\nUPDATE orders SET note = 'x';"),
    "phase-mismatch": ("-- changeover:phase expand\nALTER TABLE orders DROP COLUMN note;",
                       "-- changeover:phase contract\nALTER TABLE orders DROP COLUMN note;"),
    "prefer-bigint": ("CREATE TABLE t (id int PRIMARY KEY);", "CREATE TABLE t (id bigint PRIMARY KEY);"),
    "prefer-timestamptz": ("CREATE TABLE t (at timestamp);", "CREATE TABLE t (at timestamptz);"),
    "prefer-text": ("CREATE TABLE t (name varchar(20));", "CREATE TABLE t (name text);"),
    "prefer-identity": ("CREATE TABLE t (id bigserial PRIMARY KEY);",
                        "CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY);"),
    "parse-error": ("ALTER TABLE orders ADD COLUMN;", "ALTER TABLE orders ADD COLUMN x int;"),
    "unjudged": ("ALTER TABLE orders ATTACH PARTITION orders_2024 FOR VALUES FROM (1) TO (2);",
                 "ALTER TABLE orders SET (fillfactor = 70);"),
    "truncating-table": ("TRUNCATE orders;", "CREATE TABLE t (id bigint);\nTRUNCATE t;"),
    "locking-table": ("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE;", "LOCK TABLE orders IN ROW EXCLUSIVE MODE;"),
    "table-rewrite": ("ALTER TABLE orders SET UNLOGGED;", "CREATE TABLE t (id bigint);\nALTER TABLE t SET UNLOGGED;"),
    "refresh-matview-not-concurrent": ("REFRESH MATERIALIZED VIEW order_totals;",
                                       "REFRESH MATERIALIZED VIEW CONCURRENTLY order_totals;"),
    "transaction-incompatible": ("VACUUM orders;", "-- changeover:transaction off\nVACUUM orders;"),
    "slow-under-held-lock": (
        "ALTER TABLE orders ADD CONSTRAINT pos CHECK (total > 0) NOT VALID;\n"
        "ALTER TABLE orders VALIDATE CONSTRAINT pos;",
        "ALTER TABLE orders VALIDATE CONSTRAINT pos;"),
    "dropping-constraint": ("ALTER TABLE orders DROP CONSTRAINT orders_pkey;",
                            "ALTER TABLE orders ADD CONSTRAINT pos CHECK (total > 0) NOT VALID;"),
    "dropping-default": ("ALTER TABLE orders ALTER COLUMN note DROP DEFAULT;",
                         "ALTER TABLE orders ALTER COLUMN note SET DEFAULT 'x';"),
    "renaming-object": ("ALTER VIEW order_totals RENAME TO totals;", "ALTER INDEX orders_user RENAME TO o_user;"),
    "prefer-text-over-char": ("CREATE TABLE t (code char(3));", "CREATE TABLE t (code text);"),
    "identifier-too-long": ("CREATE TABLE t (" + "x" * 64 + " text);", "CREATE TABLE t (" + "x" * 63 + " text);"),
}


def run(tmp_path: Path, sql: str, dialect: str = "postgresql") -> ScriptAnalysis:
    ctx = LintContext(dialect)
    base = tmp_path / "0001_base.up.sql"
    base.write_text(EXISTING)
    analyze(script(base), ctx)
    p = tmp_path / "0002_case.up.sql"
    p.write_text(sql)
    return analyze(script(p), ctx)


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_positive(tmp_path: Path, rule: str) -> None:
    a = run(tmp_path, CASES[rule][0])
    assert rule in {f.rule for f in a.findings}, a.findings


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_negative(tmp_path: Path, rule: str) -> None:
    a = run(tmp_path, CASES[rule][1])
    assert rule not in {f.rule for f in a.findings}, a.findings


def test_positions_are_one_based_file_line_col(tmp_path: Path) -> None:
    a = run(tmp_path, "-- a comment\nALTER TABLE orders\n  ADD COLUMN uid uuid DEFAULT gen_random_uuid();\n")
    f = next(f for f in a.findings if f.rule == "adding-volatile-default")
    assert (f.line, f.col) == (3, 14)
    assert f.file.endswith("0002_case.up.sql") and f.recipe


def test_parse_error_has_position_not_traceback(tmp_path: Path) -> None:
    a = run(tmp_path, "SELECT 1;\nALTER TABLE orders ADD COLUMN;\n")
    f = a.parse_error
    assert f is not None and (f.line, f.col) == (2, 30)
    assert a.phase == "unsafe" and not a.statements


def test_same_migration_table_is_not_flagged(tmp_path: Path) -> None:
    a = run(tmp_path, "CREATE TABLE items (id bigint PRIMARY KEY, sku text);\n"
                      "CREATE INDEX items_sku ON items (sku);\n"
                      "ALTER TABLE items ADD COLUMN uid uuid DEFAULT gen_random_uuid();\n"
                      "ALTER TABLE items ADD CONSTRAINT u UNIQUE (sku);\n"
                      "UPDATE items SET sku = lower(sku);\n")
    assert [f.rule for f in a.findings] == []
    assert a.phase == "expand"


def test_plan_facts_lock_rewrite_phase(tmp_path: Path) -> None:
    a = run(tmp_path, "ALTER TABLE orders ADD COLUMN uid uuid DEFAULT gen_random_uuid();\n"
                      "CREATE INDEX CONCURRENTLY i ON orders (user_id);\n"
                      "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;\n"
                      "ALTER TABLE orders VALIDATE CONSTRAINT fk;\n")
    s = a.statements
    assert (s[0].lock, s[0].rewrites, s[0].phase) == ("ACCESS EXCLUSIVE", True, "unsafe")
    assert (s[1].lock, s[1].rewrites, s[1].phase) == ("SHARE UPDATE EXCLUSIVE", False, "expand")
    assert s[2].lock == "SHARE ROW EXCLUSIVE" and s[2].tables == ["orders", "users"]
    assert s[3].lock == "SHARE UPDATE EXCLUSIVE"
    assert a.transaction is False  # CONCURRENTLY: statement by statement


def test_ignore_directive_with_reason(tmp_path: Path) -> None:
    a = run(tmp_path, "-- changeover:ignore index-not-concurrent orders has 40 rows\n"
                      "CREATE INDEX orders_user ON orders (user_id);\n")
    f = a.findings[0]
    assert f.ignored == "orders has 40 rows" and not a.errors and a.phase == "expand"


def test_ignore_inside_the_script_covers_only_the_next_statement(tmp_path: Path) -> None:
    a = run(tmp_path, "-- changeover:phase expand\n"
                      "CREATE INDEX orders_a ON orders (a);\n"
                      "-- changeover:ignore index-not-concurrent orders_b is built on an empty copy\n"
                      "CREATE INDEX orders_b\n  ON orders (b);\n"
                      "CREATE INDEX orders_c ON orders (c);\n")
    by_line = {f.line: f for f in a.findings if f.rule == "index-not-concurrent"}
    assert sorted(by_line) == [2, 4, 6]
    assert by_line[4].ignored == "orders_b is built on an empty copy"
    assert by_line[2].ignored is None and by_line[6].ignored is None
    assert a.phase == "unsafe" and len(a.errors) >= 2
    # The same directive above the first statement covers the whole file, as before.
    whole = run(tmp_path, "-- changeover:ignore index-not-concurrent all three tables are tiny\n"
                          "CREATE INDEX orders_a ON orders (a);\nCREATE INDEX orders_c ON orders (c);\n")
    assert all(f.ignored for f in whole.findings if f.rule == "index-not-concurrent") and not whole.errors


def test_sqlite_gets_the_rules_that_apply(tmp_path: Path) -> None:
    a = run(tmp_path, "CREATE INDEX i ON orders (user_id);\nALTER TABLE orders RENAME COLUMN note TO n;\n"
                      "CREATE TABLE x (id INTEGER PRIMARY KEY AUTOINCREMENT, at timestamp);\n", "sqlite")
    assert {f.rule for f in a.findings} == {"renaming-column"}
    assert a.statements[2].node is None  # SQLite syntax pglast cannot read is still split and run


def test_varchar_widening_is_expand_but_narrowing_is_not(tmp_path: Path) -> None:
    assert run(tmp_path, "ALTER TABLE orders ALTER COLUMN note TYPE text;").phase == "expand"
    assert run(tmp_path, "ALTER TABLE orders ALTER COLUMN note TYPE varchar(10);").phase == "unsafe"
