"""One small connection interface over psycopg 3 (PostgreSQL) and sqlite3 (the embedded default).

Connections run in autocommit mode and the engine issues BEGIN/COMMIT itself, so a migration
that must not run in a transaction (CONCURRENTLY) and one that must are handled alike. Driver
exceptions are turned into MigrationError here, with the database's own message.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors

from changeover.errors import MigrationError
from changeover.migrations.sqltext import POSTGRES, SQLITE
from changeover.redact import redact_text

APP_NAME = "changeover-migrate"


@dataclass(frozen=True)
class Database:
    dialect: str
    target: str   # a libpq URL, or the SQLite file path

    @property
    def display(self) -> str:
        return redact_text(self.target) if self.dialect == POSTGRES else f"sqlite:///{self.target}"

    def check_dir(self) -> None:
        """SQLite: the file may be created, its directory must exist."""
        parent = Path(self.target).parent
        if self.dialect == SQLITE and not parent.is_dir():
            raise MigrationError(f"cannot open {self.display}: directory {parent} does not exist")

    def connect(self, purpose: str = "run", lock_timeout: float = 5.0) -> Conn:
        if self.dialect == POSTGRES:
            try:
                pg = psycopg.connect(self.target, autocommit=True, connect_timeout=10,
                                     application_name=f"{APP_NAME} {purpose} host={socket.gethostname()} "
                                                      f"pid={os.getpid()}"[:63])
            except psycopg.Error as e:
                raise MigrationError(f"cannot connect to {self.display}: {redact_text(str(e)).strip()}") from None
            return Conn(self, pg)
        self.check_dir()
        try:
            lite = sqlite3.connect(self.target, isolation_level=None, timeout=lock_timeout,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise MigrationError(f"cannot open {self.display}: {e}") from None
        return Conn(self, lite)


def database(url: str | None, root: Path) -> Database:
    """The [migrations] database setting -> Database. Relative SQLite paths are from the config dir."""
    if not url:
        raise MigrationError("no database configured: set [migrations] database in changeover.toml "
                             "or the DATABASE_URL environment variable")
    if url.startswith(("postgres://", "postgresql://")):
        return Database(POSTGRES, url)
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        if not path:
            raise MigrationError(f"database URL {url!r} has no file path (expected sqlite:///app.db)")
        return Database(SQLITE, str(root / path))
    if "://" in url:
        raise MigrationError(f"unsupported database URL {redact_text(url)!r} "
                             "(expected postgresql://..., sqlite:///path or a file path)")
    return Database(SQLITE, str(root / url))


def qident(name: str) -> str:
    """schema.table -> "schema"."table" (names come from the parser or the catalog)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def is_lock_timeout(e: BaseException) -> bool:
    if isinstance(e, psycopg.errors.LockNotAvailable):  # SQLSTATE 55P03
        return True
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def describe(e: BaseException) -> str:
    """A database error as one readable line: the server's message, SQLSTATE, DETAIL and HINT
    (DETAIL is where PostgreSQL says which key is duplicated, HINT what to do)."""
    if isinstance(e, psycopg.Error):
        diag = e.diag
        msg = diag.message_primary or str(e).strip().splitlines()[0]
        if diag.sqlstate:
            msg += f" (SQLSTATE {diag.sqlstate})"
        if diag.message_detail:
            msg += f"; DETAIL: {diag.message_detail}"
        if diag.message_hint:
            msg += f"; HINT: {diag.message_hint}"
        return msg
    return str(e)


class BlockerWatch:
    """Who blocks a session while it waits for a lock: pg_blocking_pids(pid), sampled from a second
    connection for as long as the block runs (once the wait times out, the server no longer knows)."""

    POLL = 0.02

    def __init__(self, db: Database, pid: int) -> None:
        self.db, self.pid = db, pid
        self.seen: list[tuple[Any, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="changeover-blockers", daemon=True)

    def __enter__(self) -> BlockerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            conn = psycopg.connect(self.db.target, autocommit=True, connect_timeout=5,
                                   application_name=f"{APP_NAME} watch")
        except psycopg.Error:
            return
        try:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT pid, application_name, state, left(regexp_replace(query, '\\s+', ' ', 'g'), 120), "
                    "now() - xact_start FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(%s))",
                    (self.pid,)).fetchall()
                if rows:
                    self.seen = rows
                self._stop.wait(self.POLL)
        except psycopg.Error:
            pass
        finally:
            conn.close()

    def describe(self) -> str:
        if not self.seen:
            return "the blocking session was not seen: look for a long transaction in pg_stat_activity"
        parts = []
        for pid, app, state, query, age in self.seen:
            held = f", in a transaction for {age.total_seconds():.1f}s" if age is not None else ""
            parts.append(f"pid {pid} (application {app or '-'!r}, {state}{held}, query: {query!r})")
        return "blocked by " + "; ".join(parts) + f" — end it with SELECT pg_terminate_backend({self.seen[0][0]})"


class Conn:
    def __init__(self, db: Database, raw: Any) -> None:
        self.db, self.raw = db, raw
        self.pg = db.dialect == POSTGRES

    def ph(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def execute(self, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement; raw driver errors propagate (the engine decides retry vs failure)."""
        if self.pg:
            cur = self.raw.execute(sql if params is None else self.ph(sql), params)
            return list(cur.fetchall()) if cur.description else []
        cur = self.raw.execute(sql, params or ())
        return list(cur.fetchall())

    def query(self, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        """Run a statement of our own: any driver error becomes a MigrationError."""
        try:
            return self.execute(sql, params)
        except (psycopg.Error, sqlite3.Error) as e:
            raise MigrationError(f"{self.db.display}: {describe(e)}") from None

    def begin(self) -> None:
        self.execute("BEGIN" if self.pg else "BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        try:
            if self.pg or self.raw.in_transaction:
                self.raw.execute("ROLLBACK")
        except (psycopg.Error, sqlite3.Error):
            pass

    def set_timeouts(self, lock_timeout: float, statement_timeout: float, local: bool) -> None:
        """SET (LOCAL) lock_timeout/statement_timeout; SQLite: the busy timeout plays lock_timeout."""
        if self.pg:
            scope = "SET LOCAL" if local else "SET"
            self.execute(f"{scope} lock_timeout = '{int(lock_timeout * 1000)}ms'")
            self.execute(f"{scope} statement_timeout = '{int(statement_timeout * 1000)}ms'")
        else:
            self.execute(f"PRAGMA busy_timeout = {int(lock_timeout * 1000)}")

    @property
    def backend_pid(self) -> int | None:
        return int(self.raw.info.backend_pid) if self.pg else None

    def watch(self) -> BlockerWatch | None:
        """A BlockerWatch on this session (PostgreSQL), for an attempt that may wait for a lock."""
        pid = self.backend_pid
        return BlockerWatch(self.db, pid) if pid is not None else None

    def close(self) -> None:
        try:
            self.raw.close()
        except (psycopg.Error, sqlite3.Error):
            pass

    # -- catalog helpers ---------------------------------------------------------------------------
    def primary_key(self, table: str) -> str | None:
        """The single-column primary key of `table`; SQLite falls back to rowid."""
        if self.pg:
            rows = self.query(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(?) AND i.indisprimary", (table,))
            return str(rows[0][0]) if len(rows) == 1 else None
        rows = self.query(f"PRAGMA table_info({qident(table)})")
        pks = [r[1] for r in rows if r[5]]
        return str(pks[0]) if len(pks) == 1 else "rowid"

    def syntax_error(self, sql: str) -> str | None:
        """SQLite: compile a statement without running it (EXPLAIN) -> its syntax error, if any.
        Other errors (a table a previous statement would create) are not syntax errors."""
        if self.pg:
            return None
        try:
            self.raw.execute(f"EXPLAIN {sql}").fetchall()
        except sqlite3.Error as e:
            return str(e) if "syntax error" in str(e) or "incomplete input" in str(e) else None
        return None

    def columns(self, table: str) -> set[str]:
        if self.pg:
            rows = self.query("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(?) AND attnum > 0 "
                              "AND NOT attisdropped", (table,))
            return {str(r[0]) for r in rows}
        return {str(r[1]) for r in self.query(f"PRAGMA table_info({qident(table)})")}

    def table_exists(self, table: str) -> bool:
        if self.pg:
            return bool(self.query("SELECT to_regclass(?) IS NOT NULL", (table,))[0][0])
        return bool(self.query("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (table,))[0][0])

    def schema_tables(self, schema: str) -> list[str]:
        """Tables of a PostgreSQL schema, qualified (SQLite has no schemas to drop)."""
        if not self.pg:
            return []
        rows = self.query("SELECT tablename FROM pg_tables WHERE schemaname = ? ORDER BY tablename", (schema,))
        return [f"{schema}.{r[0]}" for r in rows]

    def has_data(self, table: str, column: str | None = None) -> bool:
        """Whether dropping `table` (or its `column`) would destroy values."""
        if not self.table_exists(table):
            return False
        where = f" WHERE {qident(column)} IS NOT NULL" if column else ""
        try:
            return bool(self.execute(f"SELECT EXISTS (SELECT 1 FROM {qident(table)}{where})")[0][0])
        except (psycopg.Error, sqlite3.Error):
            if self.pg:
                self.rollback()
            return False  # e.g. the column does not exist: nothing to lose
