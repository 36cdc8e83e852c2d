"""Running one migration up or down, atomically where the database allows it.

A transactional migration runs all its statements and writes (or deletes) its history row in one
transaction: it is either fully applied and recorded, or not at all. A lock timeout rolls the
whole attempt back and retries it. Migrations with CONCURRENTLY (or `transaction off`) run
statement by statement; a failed CREATE INDEX CONCURRENTLY leaves an INVALID index, which is
dropped before the statement is tried again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from changeover.errors import MigrationError
from changeover.migrations import backfill, history
from changeover.migrations.config import MigrationsConfig
from changeover.migrations.db import Conn, describe, qident
from changeover.migrations.formats import Migration
from changeover.migrations.lint import ScriptAnalysis, StatementPlan
from changeover.migrations.retry import Policy, with_retries

Progress = Callable[[str], None] | None
DB_ERRORS = (psycopg.Error, sqlite3.Error)


@dataclass
class StepResult:
    version: str
    name: str
    phase: str
    duration_ms: int
    attempts: int = 1
    transaction: bool = True
    backfilled_rows: int = 0
    direction: str = "up"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "phase": self.phase, "duration_ms": self.duration_ms,
                "attempts": self.attempts, "transaction": self.transaction,
                "backfilled_rows": self.backfilled_rows, "direction": self.direction}


def policy(cfg: MigrationsConfig) -> Policy:
    return Policy(cfg.retries, cfg.backoff, cfg.backoff_max)


def _fail(m: Migration, st: StatementPlan | None, e: BaseException, tail: str, path: str) -> MigrationError:
    where = f" at {path}:{st.line}:{st.col} (statement {st.index})" if st else ""
    return MigrationError(f"{m.id} failed{where}: {describe(e)}; {tail}")


def _drop_invalid_index(conn: Conn, st: StatementPlan) -> bool:
    """Drop the INVALID index a failed CREATE INDEX CONCURRENTLY left behind. -> dropped?"""
    node = st.node
    if not conn.pg or type(node).__name__ != "IndexStmt" or not node.idxname:
        return False
    name = f"{node.relation.schemaname}.{node.idxname}" if node.relation.schemaname else node.idxname
    rows = conn.query("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(?)", (name,))
    if rows and rows[0][0]:
        conn.query(f"DROP INDEX CONCURRENTLY IF EXISTS {qident(name)}")
        return True
    return False


def apply(conn: Conn, cfg: MigrationsConfig, m: Migration, a: ScriptAnalysis, release: str | None,
          progress: Progress, resume: history.Applied | None = None) -> StepResult:
    """Apply one migration (or resume its interrupted backfill) and record it in the history."""
    t0 = time.monotonic()
    path = str(m.up.path)
    # BEGIN/COMMIT in a file would end our transaction early: the engine provides the transaction
    ddl = [s for s in a.statements if not s.backfill and s.kind != "Transaction"]
    fills = [s for s in a.statements if s.backfill]
    state = history.BACKFILLING if fills else history.APPLIED
    timeouts = (cfg.lock_timeout, cfg.statement_timeout)
    res = StepResult(m.version, m.name, a.phase, 0, transaction=a.transaction)
    if resume is None:
        if progress:
            progress(f"applying {m.id} ({a.phase}{'' if a.transaction else ', no transaction'})")
        if a.transaction:
            current: list[StatementPlan | None] = [None]

            def attempt() -> None:
                conn.begin()
                conn.set_timeouts(*timeouts, local=True)
                for st in ddl:
                    current[0] = st
                    conn.execute(st.sql)
                current[0] = None
                history.insert(conn, cfg.table, m.version, m.name, a.phase, m.checksum,
                               int((time.monotonic() - t0) * 1000), release, state)
                conn.commit()

            try:
                _, res.attempts = with_retries(attempt, policy(cfg), m.id, progress, conn.rollback)
            except DB_ERRORS as e:
                raise _fail(m, current[0], e, "rolled back: nothing of it was applied", path) from None
        else:
            _run_each(conn, cfg, m, ddl, timeouts, progress, path, res)
            try:
                conn.begin()
                history.insert(conn, cfg.table, m.version, m.name, a.phase, m.checksum,
                               int((time.monotonic() - t0) * 1000), release, state)
                conn.commit()
            except DB_ERRORS as e:
                conn.rollback()
                raise _fail(m, None, e, "its statements ran but the history row could not be written",
                            path) from None
    elif progress:
        progress(f"resuming the backfill of {m.id}")
    for i, st in enumerate(fills):
        start: str | None = None
        if resume is not None and resume.backfill_position:
            tag, _, pos = resume.backfill_position.partition(":")
            if int(tag) > i:
                continue
            start = pos if int(tag) == i else None
        spec = next(b for b in m.up.directives.backfills if b.table.split(".")[-1] in st.tables)
        try:
            r = backfill.run(conn, st.sql, st.node, spec.table, spec.key, spec.batch or cfg.batch_size,
                             cfg.batch_pause if spec.pause is None else spec.pause, cfg.table, m.version, i,
                             start, timeouts, policy(cfg), progress)
        except DB_ERRORS as e:
            conn.rollback()
            raise _fail(m, st, e, "the batches done so far are kept; run again to resume", path) from None
        res.backfilled_rows += r.rows
    res.duration_ms = int((time.monotonic() - t0) * 1000)
    if fills:
        conn.begin()
        history.set_state(conn, cfg.table, m.version, history.APPLIED, None,
                          res.duration_ms if resume is None else 0)
        conn.commit()
    return res


def _run_each(conn: Conn, cfg: MigrationsConfig, m: Migration, statements: list[StatementPlan],
              timeouts: tuple[float, float], progress: Progress, path: str, res: StepResult,
              up: bool = True) -> None:
    """Statement by statement, outside a transaction (CONCURRENTLY)."""
    conn.set_timeouts(*timeouts, local=False)
    try:
        for n, st in enumerate(statements):
            if st.concurrent and _drop_invalid_index(conn, st) and progress:
                progress(f"{m.id}: dropped the INVALID index a failed earlier build left behind")

            def attempt(st: StatementPlan = st) -> None:
                try:
                    conn.execute(st.sql)
                except Exception:
                    if st.concurrent:
                        _drop_invalid_index(conn, st)
                    raise

            try:
                _, attempts = with_retries(attempt, policy(cfg), f"{m.id} statement {st.index}", progress,
                                           conn.rollback)
                res.attempts = max(res.attempts, attempts)
            except DB_ERRORS as e:
                done = f"statements 1-{n} ran and stay" if n else "none of its statements ran"
                state = "not recorded as applied" if up else "still recorded as applied"
                raise _fail(m, st, e, f"it runs without a transaction: {done}; the migration is {state}, "
                            "fix it and run again (IF [NOT] EXISTS makes it re-runnable)", path) from None
    finally:
        if conn.pg:
            conn.rollback()
            conn.query("RESET lock_timeout")
            conn.query("RESET statement_timeout")


def _relname(rv: Any) -> str:
    return f"{rv.schemaname}.{rv.relname}" if getattr(rv, "schemaname", None) else str(rv.relname)


def data_loss(conn: Conn, a: ScriptAnalysis) -> list[str]:
    """What a down script would destroy: tables, columns and rows that hold values now."""
    out = []
    for st in a.statements:
        node = st.node
        kind = type(node).__name__
        if kind == "DropStmt" and str(node.removeType.name) == "OBJECT_TABLE":
            out += [f"table {t}" for t in st.tables if conn.has_data(t)]
        elif kind == "DropStmt" and str(node.removeType.name) == "OBJECT_SCHEMA":
            for obj in node.objects or ():
                schema = str(getattr(obj, "sval", obj))
                full = [t for t in conn.schema_tables(schema) if conn.has_data(t)]
                if full:
                    out.append(f"schema {schema} (tables with rows: {', '.join(full)})")
        elif kind == "TruncateStmt":
            out += [f"rows of {t} (TRUNCATE)" for t in map(_relname, node.relations or ()) if conn.has_data(t)]
        elif kind == "DeleteStmt" and node.whereClause is None:
            table = _relname(node.relation)
            if conn.has_data(table):
                out.append(f"rows of {table} (DELETE without WHERE)")
        elif kind == "AlterTableStmt":
            table = _relname(node.relation)
            for cmd in node.cmds or ():
                sub = str(cmd.subtype.name)
                if sub == "AT_DropColumn" and conn.has_data(table, cmd.name):
                    out.append(f"column {table}.{cmd.name}")
                elif sub == "AT_AlterColumnType" and conn.has_data(table, cmd.name):
                    out.append(f"values of {table}.{cmd.name} (converted to another type)")
        elif node is None:
            words = st.sql.replace(";", " ").split()
            head = [w.upper() for w in words[:3]]
            if head[:2] == ["DROP", "TABLE"]:
                name = words[-1].strip('"`[]')
                if conn.has_data(name):
                    out.append(f"table {name}")
            elif head[:2] == ["DELETE", "FROM"] and len(words) == 3:
                name = words[2].strip('"`[]')
                if conn.has_data(name):
                    out.append(f"rows of {name} (DELETE without WHERE)")
    return out


def revert(conn: Conn, cfg: MigrationsConfig, m: Migration, a: ScriptAnalysis, progress: Progress) -> StepResult:
    """Run the down script and delete the history row, in one transaction where possible."""
    t0 = time.monotonic()
    assert m.down is not None
    path = str(m.down.path)
    timeouts = (cfg.lock_timeout, cfg.statement_timeout)
    res = StepResult(m.version, m.name, a.phase, 0, transaction=a.transaction, direction="down")
    statements = [s for s in a.statements if s.kind != "Transaction"]
    if progress:
        progress(f"rolling back {m.id}")
    if a.transaction:
        current: list[StatementPlan | None] = [None]

        def attempt() -> None:
            conn.begin()
            conn.set_timeouts(*timeouts, local=True)
            for st in statements:
                current[0] = st
                conn.execute(st.sql)
            current[0] = None
            history.delete(conn, cfg.table, m.version)
            conn.commit()

        try:
            _, res.attempts = with_retries(attempt, policy(cfg), f"rollback of {m.id}", progress, conn.rollback)
        except DB_ERRORS as e:
            err = _fail(m, current[0], e, "rolled back: the migration is still applied and recorded", path)
            raise MigrationError(f"rollback of {err}") from None
    else:
        _run_each(conn, cfg, m, statements, timeouts, progress, path, res, up=False)
        conn.begin()
        history.delete(conn, cfg.table, m.version)
        conn.commit()
    res.duration_ms = int((time.monotonic() - t0) * 1000)
    return res
