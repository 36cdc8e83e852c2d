"""The history table: one row per applied migration, written in the migration's own transaction.

state is `applied`, or `backfilling` while a declared backfill is still running (its DDL is
committed; the next run resumes the batches from `backfill_position`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from changeover.migrations.db import Conn

APPLIED, BACKFILLING = "applied", "backfilling"


@dataclass(frozen=True)
class Applied:
    version: str
    name: str
    phase: str
    checksum: str
    applied_at: str
    duration_ms: int
    release: str | None
    state: str
    backfill_position: str | None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "phase": self.phase, "checksum": self.checksum,
                "applied_at": self.applied_at, "duration_ms": self.duration_ms, "release": self.release,
                "state": self.state, "backfill_position": self.backfill_position}


def ensure(conn: Conn, table: str) -> None:
    ts = "timestamptz NOT NULL DEFAULT now()" if conn.pg else "text NOT NULL"
    conn.query(f"""CREATE TABLE IF NOT EXISTS {table} (
        version text PRIMARY KEY,
        name text NOT NULL,
        phase text NOT NULL,
        checksum text NOT NULL,
        applied_at {ts},
        duration_ms bigint NOT NULL DEFAULT 0,
        release text,
        state text NOT NULL DEFAULT 'applied',
        backfill_position text)""")


def load(conn: Conn, table: str) -> dict[str, Applied]:
    """Applied migrations by version (normalised: leading zeros dropped)."""
    if not conn.table_exists(table):
        return {}
    rows = conn.query(f"SELECT version, name, phase, checksum, applied_at, duration_ms, release, state, "
                      f"backfill_position FROM {table} ORDER BY version")
    out = {}
    for r in rows:
        at = r[4].isoformat() if hasattr(r[4], "isoformat") else str(r[4])
        out[str(int(r[0]))] = Applied(str(r[0]), r[1], r[2], r[3], at, int(r[5]), r[6], r[7], r[8])
    return out


def insert(conn: Conn, table: str, version: str, name: str, phase: str, checksum: str, duration_ms: int,
           release: str | None, state: str = APPLIED) -> None:
    """Raw execute: runs inside the migration's transaction, errors go to the engine."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if conn.pg:
        conn.execute(f"INSERT INTO {table} (version, name, phase, checksum, duration_ms, release, state) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (version, name, phase, checksum, duration_ms, release, state))
    else:
        conn.execute(f"INSERT INTO {table} (version, name, phase, checksum, applied_at, duration_ms, release, "
                     "state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (version, name, phase, checksum, now, duration_ms, release, state))


def set_state(conn: Conn, table: str, version: str, state: str, position: str | None,
              add_ms: int = 0) -> None:
    conn.execute(f"UPDATE {table} SET state = ?, backfill_position = ?, duration_ms = duration_ms + ? "
                 "WHERE version = ?", (state, position, add_ms, version))


def delete(conn: Conn, table: str, version: str) -> None:
    conn.execute(f"DELETE FROM {table} WHERE version = ?", (version,))


def set_checksum(conn: Conn, table: str, version: str, checksum: str) -> None:
    conn.query(f"UPDATE {table} SET checksum = ? WHERE version = ?", (checksum, version))
