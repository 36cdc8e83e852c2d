"""Running one migration up or down, atomically where the database allows it.

A transactional migration runs all its statements and writes its history row in one transaction:
it is either fully applied and recorded, or not at all. A lock timeout rolls the whole attempt
back and retries it. Transaction control in the file behaves as `psql -f` would, inside ours:
BEGIN/COMMIT become a savepoint and its release, a ROLLBACK undoes back to the BEGIN, SAVEPOINT
and ROLLBACK TO run as written (so a script ending in ROLLBACK keeps nothing).

Migrations with CONCURRENTLY (or `transaction off`) run statement by statement; each statement is
retried on its own, a failed CREATE INDEX CONCURRENTLY's INVALID index is dropped before the next
attempt (see concurrent.py). One that fails after some statements ran is recorded `dirty`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg

from changeover.errors import MigrationError
from changeover.migrations import backfill, history
from changeover.migrations.concurrent import IndexBuild
from changeover.migrations.config import MigrationsConfig
from changeover.migrations.dataloss import data_loss
from changeover.migrations.db import Conn, describe
from changeover.migrations.formats import Migration
from changeover.migrations.lint import ScriptAnalysis, StatementPlan
from changeover.migrations.retry import Policy, with_retries

__all__ = ["StepResult", "apply", "data_loss", "named", "policy", "revert"]

Progress = Callable[[str], None] | None
DB_ERRORS = (psycopg.Error, sqlite3.Error)
_BLOCK = "changeover_script_block"   # the savepoint that plays a BEGIN ... COMMIT block of the file


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
    notes: list[str] = field(default_factory=list)   # e.g. "its ROLLBACK at line 4 undid lines 1-3"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "phase": self.phase, "duration_ms": self.duration_ms,
                "attempts": self.attempts, "transaction": self.transaction,
                "backfilled_rows": self.backfilled_rows, "direction": self.direction, "notes": self.notes}


T = TypeVar("T")


def named(m: Migration, fn: Callable[[], T]) -> T:
    """Every error of a migration's run names the migration."""
    try:
        return fn()
    except MigrationError as e:
        if m.id in str(e):
            raise
        raise type(e)(f"{m.id}: {e}") from None


def policy(cfg: MigrationsConfig) -> Policy:
    return Policy(cfg.retries, cfg.backoff, cfg.backoff_max)


def _fail(m: Migration, st: StatementPlan | None, e: BaseException, tail: str, path: str) -> MigrationError:
    where = f" at {path}:{st.line}:{st.col} (statement {st.index})" if st else ""
    return MigrationError(f"{m.id} failed{where}: {describe(e)}; {tail}")


# -- transaction control in a script ------------------------------------------------------------
def _tx_kind(st: StatementPlan) -> str | None:
    """BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE, ROLLBACK_TO, PREPARE...; None: not transaction control."""
    node = st.node
    if type(node).__name__ == "TransactionStmt":
        kind = str(node.kind.name).removeprefix("TRANS_STMT_")
        return {"START": "BEGIN"}.get(kind, kind)
    if node is None:  # SQLite spellings pglast cannot read: BEGIN IMMEDIATE, END TRANSACTION
        head = (st.sql.split() or [""])[0].upper()
        return {"BEGIN": "BEGIN", "END": "COMMIT", "COMMIT": "COMMIT"}.get(head)
    return None


@dataclass
class _Script:
    steps: list[tuple[StatementPlan, list[str]]]   # each statement and the SQL that plays it
    notes: list[str]


def _in_transaction(a: ScriptAnalysis, path: str) -> _Script:
    """Statements as they run inside the engine's transaction, with psql's meaning kept."""
    out = _Script([], [])
    begin: StatementPlan | None = None
    for st in a.statements:
        kind = _tx_kind(st)
        if kind is None:
            out.steps.append((st, [st.sql]))
            continue
        chain = bool(getattr(st.node, "chain", False))
        sql: list[str] = []
        if kind == "BEGIN":
            if begin is None:  # psql: a BEGIN inside a block only warns
                sql, begin = [f"SAVEPOINT {_BLOCK}"], st
        elif kind in ("COMMIT", "ROLLBACK"):
            if begin is not None:
                if kind == "ROLLBACK":
                    sql = [f"ROLLBACK TO SAVEPOINT {_BLOCK}"]
                    out.notes.append(f"its ROLLBACK at line {st.line} undid what ran since the BEGIN at line "
                                     f"{begin.line}, as psql would")
                sql.append(f"RELEASE SAVEPOINT {_BLOCK}")
                begin = None
                if chain:
                    sql.append(f"SAVEPOINT {_BLOCK}")
                    begin = st
        elif kind in ("SAVEPOINT", "RELEASE", "ROLLBACK_TO"):
            sql = [st.sql]
        else:
            raise MigrationError(f"{path}:{st.line}:{st.col}: {' '.join(st.sql.split()[:2])}: two-phase "
                                 "commit is not supported in a migration")
        out.steps.append((st, sql))
    if begin is not None:  # psql ends the session: the open block is rolled back
        out.steps.append((begin, [f"ROLLBACK TO SAVEPOINT {_BLOCK}", f"RELEASE SAVEPOINT {_BLOCK}"]))
        out.notes.append(f"its BEGIN at line {begin.line} is never committed: what ran after it was undone, "
                         "as psql would")
    return out


def _statement_by_statement(a: ScriptAnalysis, path: str) -> list[StatementPlan]:
    """Without a transaction BEGIN/COMMIT mean nothing; a ROLLBACK or savepoint cannot work."""
    out = []
    for st in a.statements:
        kind = _tx_kind(st)
        if kind is None:
            out.append(st)
        elif kind not in ("BEGIN", "COMMIT"):
            raise MigrationError(f"{path}:{st.line}:{st.col}: {' '.join(st.sql.split()[:3])} cannot work in a "
                                 "migration that runs without a transaction (CONCURRENTLY or `transaction off`)")
    return out


# -- up -------------------------------------------------------------------------------------------
def apply(conn: Conn, cfg: MigrationsConfig, m: Migration, a: ScriptAnalysis, release: str | None,
          progress: Progress, resume: history.Applied | None = None) -> StepResult:
    """Apply one migration (or resume its interrupted backfill) and record it in the history."""
    t0 = time.monotonic()
    path = str(m.up.path)
    fills = [s for s in a.statements if s.backfill]
    state = history.BACKFILLING if fills else history.APPLIED
    timeouts = (cfg.lock_timeout, cfg.statement_timeout)
    res = StepResult(m.version, m.name, a.phase, 0, transaction=a.transaction)
    if resume is None:
        if progress:
            progress(f"applying {m.id} ({a.phase}{'' if a.transaction else ', no transaction'})")
        if a.transaction:
            script = _in_transaction(a, path)
            current: list[StatementPlan | None] = [None]

            def attempt() -> None:
                conn.begin()
                conn.set_timeouts(*timeouts, local=True)
                for st, sqls in script.steps:
                    if st.backfill:
                        continue
                    current[0] = st
                    for sql in sqls:
                        conn.execute(sql)
                current[0] = None
                history.insert(conn, cfg.table, m.version, m.name, a.phase, m.checksum,
                               int((time.monotonic() - t0) * 1000), release, state)
                conn.commit()

            try:
                _, res.attempts = with_retries(attempt, policy(cfg), m.id, progress, conn.rollback, conn.watch)
            except DB_ERRORS as e:
                raise _fail(m, current[0], e, "rolled back: nothing of it was applied", path) from None
            res.notes += script.notes
        else:
            ddl = [s for s in _statement_by_statement(a, path) if not s.backfill]
            _run_each(conn, cfg, m, ddl, timeouts, progress, path, res, release, up=True)
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
    if progress:
        for note in res.notes:
            progress(f"{m.id}: {note}")
    return res


def _run_each(conn: Conn, cfg: MigrationsConfig, m: Migration, statements: list[StatementPlan],
              timeouts: tuple[float, float], progress: Progress, path: str, res: StepResult,
              release: str | None, up: bool) -> None:
    """Statement by statement, outside a transaction (CONCURRENTLY). A failure after some statements
    ran marks the migration dirty, so nobody mistakes it for pending (or for applied)."""
    conn.set_timeouts(*timeouts, local=False)
    ran: list[StatementPlan] = []
    try:
        for st in statements:
            build: IndexBuild | None = None
            try:
                if st.concurrent and conn.pg and type(st.node).__name__ == "IndexStmt":
                    build = IndexBuild(conn, st.node)

                def attempt(st: StatementPlan = st, build: IndexBuild | None = build) -> None:
                    if build is not None:
                        build.drop_leftovers()  # a lock timeout here is retried like the build's own
                    try:
                        conn.execute(st.sql)
                    except Exception:
                        if build is not None:
                            try:
                                build.drop_leftovers()
                            except DB_ERRORS:
                                pass  # the next attempt (or the next run) drops it
                        raise

                _, attempts = with_retries(attempt, policy(cfg), f"{m.id} statement {st.index}", progress,
                                           conn.rollback, conn.watch)
                res.attempts = max(res.attempts, attempts)
                if build is not None:
                    build.drop_duplicates()
                    if build.dropped and progress:
                        progress(f"{m.id}: dropped the INVALID index(es) failed builds left: "
                                 f"{', '.join(build.dropped)}")
            except (*DB_ERRORS, MigrationError) as e:
                raise _failed_midway(conn, cfg, m, res, st, e, ran, build, path, release, up) from None
            ran.append(st)
    finally:
        if conn.pg:
            conn.rollback()
            conn.query("RESET lock_timeout")
            conn.query("RESET statement_timeout")


def _failed_midway(conn: Conn, cfg: MigrationsConfig, m: Migration, res: StepResult, st: StatementPlan,
                   e: BaseException,
                   ran: list[StatementPlan], build: IndexBuild | None, path: str, release: str | None,
                   up: bool) -> MigrationError:
    cause = describe(e) if isinstance(e, DB_ERRORS) else str(e)
    left = ""
    if build is not None:
        try:
            names = build.leftovers()
        except DB_ERRORS:
            names = []
        if names:
            left = f"; the INVALID index {', '.join(names)} it left is dropped by the next run"
    where = f"{path}:{st.line}:{st.col} (statement {st.index})"
    if not ran:
        state = "not recorded as applied" if up else "still recorded as applied"
        return MigrationError(f"{'' if up else 'rollback of '}{m.id} failed at {where}: {cause}; it runs without a "
                              f"transaction and none of its statements ran; the migration is {state}{left}")
    done = f"statement{'s' if len(ran) > 1 else ''} {', '.join(str(s.index) for s in ran)}"
    detail = f"{'up' if up else 'down'}: statement {st.index} (line {st.line}) failed after {done} ran: {cause}"
    recorded = "recorded as dirty"
    try:
        conn.rollback()
        conn.begin()
        if up:
            history.insert(conn, cfg.table, m.version, m.name, res.phase, m.checksum, 0, release,
                           history.DIRTY, detail)
        else:
            history.set_state(conn, cfg.table, m.version, history.DIRTY, None, failed=detail)
        conn.commit()
    except DB_ERRORS as err:
        conn.rollback()
        recorded = f"NOT recorded as dirty ({describe(err)})"
    return MigrationError(
        f"{'' if up else 'rollback of '}{m.id} failed at {where}: {cause}; it runs without a transaction: "
        f"{done} ran and stay{left}; the migration is {recorded} "
        "— finish or undo its statements by hand, then run `changeover migrate repair --dirty applied` "
        "(its changes are all in place) or `--dirty pending` (none are: the next run applies it again)")


# -- down -----------------------------------------------------------------------------------------
def revert(conn: Conn, cfg: MigrationsConfig, m: Migration, a: ScriptAnalysis, progress: Progress) -> StepResult:
    """Run the down script and mark the history row reverted, in one transaction where possible."""
    t0 = time.monotonic()
    assert m.down is not None
    path = str(m.down.path)
    timeouts = (cfg.lock_timeout, cfg.statement_timeout)
    res = StepResult(m.version, m.name, a.phase, 0, transaction=a.transaction, direction="down")
    if progress:
        progress(f"rolling back {m.id}")
    if a.transaction:
        script = _in_transaction(a, path)
        current: list[StatementPlan | None] = [None]

        def attempt() -> None:
            conn.begin()
            conn.set_timeouts(*timeouts, local=True)
            for st, sqls in script.steps:
                current[0] = st
                for sql in sqls:
                    conn.execute(sql)
            current[0] = None
            history.revert(conn, cfg.table, m.version)
            conn.commit()

        try:
            _, res.attempts = with_retries(attempt, policy(cfg), f"rollback of {m.id}", progress, conn.rollback,
                                           conn.watch)
        except DB_ERRORS as e:
            err = _fail(m, current[0], e, "rolled back: the migration is still applied and recorded", path)
            raise MigrationError(f"rollback of {err}") from None
        res.notes += script.notes
    else:
        _run_each(conn, cfg, m, _statement_by_statement(a, path), timeouts, progress, path, res, None, up=False)
        conn.begin()
        history.revert(conn, cfg.table, m.version)
        conn.commit()
    res.duration_ms = int((time.monotonic() - t0) * 1000)
    return res
