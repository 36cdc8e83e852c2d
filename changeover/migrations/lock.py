"""One migration runner at a time.

PostgreSQL: a session advisory lock held by a *separate*, idle connection. Holding it in the
connection that runs `CREATE INDEX CONCURRENTLY` would make the index build wait for the lock
holder's transaction forever (Flyway's long-open deadlock); an idle session has no snapshot, so
the build never waits on it. SQLite: an exclusive flock on a file beside the database.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from changeover.errors import MigrationError, MigrationLockHeld
from changeover.migrations.db import Conn, Database

# fits in 31 bits so pg_locks shows it as classid 0 / objid LOCK_KEY
LOCK_KEY = 0x6368_676F  # "chgo"


def _pg_holder(conn: Conn) -> str:
    rows = conn.query(
        "SELECT a.pid, a.application_name, a.backend_start FROM pg_locks l JOIN pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = ? "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())", (LOCK_KEY,))
    if not rows:
        return "holder unknown"
    pid, app, since = rows[0]
    host = next((p[5:] for p in str(app).split() if p.startswith("host=")), "?")
    os_pid = next((p[4:] for p in str(app).split() if p.startswith("pid=")), "?")
    return f"pid {os_pid} (backend {pid}), host {host}, since {since:%Y-%m-%d %H:%M:%S %Z}".rstrip()


@contextmanager
def runner_lock(db: Database, wait: bool = False, timeout: float | None = None, poll: float = 0.2,
                on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the runner lock for the block, or raise MigrationLockHeld naming the holder."""
    if db.dialect == "postgresql":
        with _pg_lock(db, wait, timeout, poll, on_wait):
            yield
    else:
        db.check_dir()
        with _file_lock(db.target + ".changeover-lock", wait, timeout, poll, on_wait):
            yield


@contextmanager
def _pg_lock(db: Database, wait: bool, timeout: float | None, poll: float,
             on_wait: Callable[[str], None] | None) -> Iterator[None]:
    conn = db.connect("lock")
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while not conn.query("SELECT pg_try_advisory_lock(?)", (LOCK_KEY,))[0][0]:
            holder = _pg_holder(conn)
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise MigrationLockHeld(f"another migration run holds the lock ({holder}); "
                                        "wait for it, or pass --wait")
            if on_wait and not told:
                on_wait(f"waiting for the migration lock ({holder})")
                told = True
            time.sleep(poll)
        try:
            yield
        finally:
            conn.query("SELECT pg_advisory_unlock(?)", (LOCK_KEY,))
    finally:
        conn.close()


@contextmanager
def _file_lock(path: str, wait: bool, timeout: float | None, poll: float,
               on_wait: Callable[[str], None] | None) -> Iterator[None]:
    try:
        f: IO[str] = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as e:
        raise MigrationError(f"cannot open the runner lock file {path}: {e.strerror}") from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                try:
                    info = json.loads(f.read() or "{}")
                    holder = f"pid {info.get('pid')}, host {info.get('host')}, since {info.get('since')}"
                except ValueError:
                    holder = "holder unknown"
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    raise MigrationLockHeld(f"another migration run holds the lock ({holder}); "
                                            "wait for it, or pass --wait") from None
                if on_wait and not told:
                    on_wait(f"waiting for the migration lock ({holder})")
                    told = True
                time.sleep(poll)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()
