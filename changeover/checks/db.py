"""Database checks: connectivity, data integrity assertions and the connection budget.

PostgreSQL goes through psycopg's async API; SQLite through sqlite3 in a worker thread, opened
without creating the file (a missing database is a failure, not a fresh empty one). Integrity SQL
runs in a read-only transaction with statement and lock timeouts, so an assertion can neither
change data nor queue behind a migration's lock.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg

from changeover.checks.config import Budget, Integrity
from changeover.checks.result import Failed, Outcome, passed, shorten, skipped

SAMPLE_ROWS = 5            # offending rows quoted in a failed integrity assertion
APPLICATION_NAME = "changeover-check"


def kind_of(url: str) -> str:
    """'postgresql', 'sqlite', or raise Failed for anything else."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("postgres", "postgresql"):
        return "postgresql"
    if scheme == "sqlite":
        return "sqlite"
    raise Failed(f"unsupported database URL scheme {scheme!r} (PostgreSQL and SQLite are supported)")


def sqlite_path(url: str) -> str:
    # Same reading as the example app: sqlite:///relative.db, sqlite:////abs/path.db, sqlite:// = memory
    return url.removeprefix("sqlite:///").removeprefix("sqlite://") or ":memory:"


def _sqlite_connect(url: str, mode: str, timeout: float) -> sqlite3.Connection:
    path = sqlite_path(url)
    if path == ":memory:":
        return sqlite3.connect(":memory:")
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode={mode}", uri=True, timeout=timeout)
        conn.execute("PRAGMA schema_version").fetchone()  # opening is lazy: touch the file
    except sqlite3.Error as e:
        raise Failed(f"cannot open SQLite database {path}: {e}") from None
    return conn


async def _pg_connect(url: str, timeout: float, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    try:
        # libpq rounds connect_timeout to whole seconds and treats < 2 as 2
        return await psycopg.AsyncConnection.connect(
            url, connect_timeout=max(2, math.ceil(timeout)), autocommit=autocommit,
            application_name=APPLICATION_NAME)
    except psycopg.Error as e:
        raise Failed(f"cannot connect: {shorten(str(e))}") from None


def _pg_error(e: psycopg.Error, timeout: float) -> Failed:
    if isinstance(e, psycopg.errors.QueryCanceled):
        return Failed(f"statement timeout: no answer within {timeout:g}s")
    if isinstance(e, psycopg.errors.LockNotAvailable):
        return Failed(f"lock timeout: a table it reads stayed locked for {timeout:g}s")
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
        return Failed("the assertion tried to write: integrity SQL runs read-only")
    return Failed(shorten(f"{type(e).__name__}: {e}"))


# -- connectivity ----------------------------------------------------------------------------

async def connectivity(url: str, timeout: float) -> Outcome:
    """Connect and SELECT 1; the latency of each is in the data."""
    kind = kind_of(url)
    t0 = time.perf_counter()
    if kind == "sqlite":
        def probe() -> float:
            conn = _sqlite_connect(url, "rw", timeout)
            try:
                t1 = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                return time.perf_counter() - t1
            finally:
                conn.close()

        query = await asyncio.to_thread(probe)
        return passed(f"SQLite {sqlite_path(url)}: SELECT 1 in {query * 1000:.1f} ms",
                      engine="sqlite", query_ms=round(query * 1000, 2))
    conn = await _pg_connect(url, timeout)
    connect = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        try:
            await conn.execute("SELECT 1")
            server = conn.info.server_version
        except psycopg.Error as e:
            raise _pg_error(e, timeout) from None
        query = time.perf_counter() - t1
    finally:
        await conn.close()
    version = f"{server // 10000}.{server % 10000}"
    return passed(f"PostgreSQL {version}: connected in {connect * 1000:.0f} ms, "
                  f"SELECT 1 in {query * 1000:.1f} ms",
                  engine="postgresql", server_version=version,
                  connect_ms=round(connect * 1000, 2), query_ms=round(query * 1000, 2))


# -- integrity -------------------------------------------------------------------------------

def _judge(rows: list[tuple[Any, ...]], more: bool, int_bools: bool = False) -> Outcome:
    """No rows, or a single true, passes. int_bools: SQLite has no boolean type, 1/0 stand in."""
    if not rows:
        return passed("no rows")
    if len(rows) == 1 and len(rows[0]) == 1 and not more:
        v = rows[0][0]
        as_bool = v if isinstance(v, bool) else None
        if int_bools and type(v) is int and v in (0, 1):
            as_bool = bool(v)
        if as_bool is True:
            return passed("returned true")
        if as_bool is False:
            raise Failed("returned false")
    count = f"{len(rows)}+" if more else str(len(rows))
    sample = "; ".join(shorten(repr(r), 120) for r in rows)
    raise Failed(f"returned {count} row{'s' if count != '1' else ''} (must return no rows or true): {sample}",
                 {"rows": count})


async def integrity(url: str, check: Integrity) -> Outcome:
    timeout = check.timeout
    if kind_of(url) == "sqlite":
        def run() -> tuple[list[tuple[Any, ...]], bool]:
            conn = _sqlite_connect(url, "ro", timeout)
            deadline = time.monotonic() + timeout
            conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            try:
                cur = conn.execute(check.sql)
                rows = cur.fetchmany(SAMPLE_ROWS + 1)
            except sqlite3.OperationalError as e:
                if "interrupted" in str(e):
                    raise Failed(f"statement timeout: no answer within {timeout:g}s") from None
                raise Failed(f"OperationalError: {e}") from None
            except sqlite3.Error as e:
                raise Failed(f"{type(e).__name__}: {e}") from None
            finally:
                conn.close()
            return rows[:SAMPLE_ROWS], len(rows) > SAMPLE_ROWS

        rows, more = await asyncio.to_thread(run)
        return _judge(rows, more, int_bools=True)

    conn = await _pg_connect(url, timeout)
    try:
        ms = str(max(1, int(timeout * 1000)))
        try:
            # Session-wide, not just this transaction: the SQL may hold several statements, and a
            # "COMMIT; DELETE ..." must land in another read-only transaction, not in autocommit.
            await conn.execute("SELECT set_config('default_transaction_read_only', 'on', false), "
                               "set_config('statement_timeout', %s, false), "
                               "set_config('lock_timeout', %s, false)", (ms, ms))
            await conn.set_autocommit(False)
            cur = await conn.execute(check.sql.encode())
            rows = await cur.fetchmany(SAMPLE_ROWS + 1) if cur.description else []
        except psycopg.Error as e:
            raise _pg_error(e, timeout) from None
        finally:
            await conn.rollback()
    finally:
        await conn.close()
    return _judge(list(rows[:SAMPLE_ROWS]), len(rows) > SAMPLE_ROWS)


# -- connection budget -------------------------------------------------------------------------

_BUDGET_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
         + coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int,
       r.rolconnlimit,
       (SELECT count(*) FROM pg_stat_activity
         WHERE usename = current_user AND pid <> pg_backend_pid())::int,
       d.datconnlimit,
       (SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid())::int
FROM pg_roles r, pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()
"""


async def budget(url: str, b: Budget) -> Outcome:
    """Room for the green pool: the tightest of the server, role and database limits.
    Reserved (superuser) slots are never counted as room: they are for operators."""
    if kind_of(url) == "sqlite":
        return skipped("SQLite has no connection limit")
    conn = await _pg_connect(url, b.timeout)
    try:
        try:
            row = await (await conn.execute(_BUDGET_SQL)).fetchone()
        except psycopg.Error as e:
            raise _pg_error(e, b.timeout) from None
    finally:
        await conn.close()
    if row is None:
        raise Failed("cannot read the connection settings (role or database not found in the catalogs)")
    max_conn, reserved, in_use, role_limit, role_use, db_limit, db_use = row
    server_free = max_conn - reserved - in_use
    limits = [("server", server_free,
               f"max_connections {max_conn} - {reserved} reserved - {in_use} in use = {server_free} free")]
    if role_limit >= 0:
        limits.append(("role", role_limit - role_use,
                       f"role limit {role_limit} - {role_use} in use = {role_limit - role_use} free"))
    if db_limit >= 0:
        limits.append(("database", db_limit - db_use,
                       f"database limit {db_limit} - {db_use} in use = {db_limit - db_use} free"))
    scope, free, how = min(limits, key=lambda x: x[1])
    need = b.green_pool + b.headroom
    wanted = f"green pool {b.green_pool}" + (f" + headroom {b.headroom}" if b.headroom else "")
    data = {"max_connections": max_conn, "reserved": reserved, "in_use": in_use, "free": free,
            "limited_by": scope, "green_pool": b.green_pool, "headroom": b.headroom, "needed": need}
    if free < need:
        raise Failed(f"not enough connections for the green slot: {how}, but {wanted} needs {need} "
                     f"(short by {need - free}); raise the limit, shrink the pool or stop idle clients", data)
    return passed(f"{how}; {wanted} needs {need}: {free - need} to spare", **data)
