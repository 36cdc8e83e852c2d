"""The history table: one row per migration, written in the migration's own transaction.

state is
  applied      fully applied;
  backfilling  its DDL is committed and a declared backfill is still running (the next run
               resumes the batches from `backfill_position`);
  dirty        a migration without a transaction failed after running some of its statements
               (`failed` says which, and why): nothing runs until `migrate repair` resolves it;
  reverted     rolled back: not applied, the row is kept so that re-applying keeps its release tag.

applied_at is written from the clock of the host that runs changeover (not the database's), so it
compares with the release times in the daemon's state (release-aware rollback).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from changeover.errors import ChecksumMismatch, MigrationError
from changeover.migrations.db import Conn
from changeover.migrations.formats import Migration, norm, version_key

APPLIED, BACKFILLING, DIRTY, REVERTED = "applied", "backfilling", "dirty", "reverted"
_COLUMNS = "version, name, phase, checksum, applied_at, duration_ms, release, state, backfill_position"


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
    failed: str | None = None        # dirty: which statement failed, and the error
    applied_ts: float | None = None  # applied_at as a Unix time

    @property
    def id(self) -> str:
        return f"{self.version}_{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "phase": self.phase, "checksum": self.checksum,
                "applied_at": self.applied_at, "duration_ms": self.duration_ms, "release": self.release,
                "state": self.state, "backfill_position": self.backfill_position, "failed": self.failed}


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
        backfill_position text,
        failed text)""")
    if "failed" not in conn.columns(table):  # a history table from before dirty states
        conn.query(f"ALTER TABLE {table} ADD COLUMN failed text")


def _ts(value: Any) -> tuple[str, float | None]:
    if isinstance(value, datetime):
        return value.isoformat(), value.timestamp()
    text = str(value)
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return text, datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return text, None


def load(conn: Conn, table: str, reverted: bool = False) -> dict[str, Applied]:
    """Rows by normalised version (formats.norm); reverted rows only when asked."""
    if not conn.table_exists(table):
        return {}
    failed = ", failed" if "failed" in conn.columns(table) else ", NULL"
    rows = conn.query(f"SELECT {_COLUMNS}{failed} FROM {table}")
    out = {}
    for r in rows:
        if r[7] == REVERTED and not reverted:
            continue
        at, ts = _ts(r[4])
        out[norm(str(r[0]))] = Applied(str(r[0]), r[1], r[2], r[3], at, int(r[5]), r[6], r[7], r[8], r[9], ts)
    return out


def insert(conn: Conn, table: str, version: str, name: str, phase: str, checksum: str, duration_ms: int,
           release: str | None, state: str = APPLIED, failed: str | None = None) -> None:
    """Raw execute: runs inside the migration's transaction, errors go to the engine.
    A reverted row of the same version is replaced; its release tag is kept when none is given."""
    now = time.time()
    old = conn.execute(f"SELECT release FROM {table} WHERE version = ? AND state = ?", (version, REVERTED))
    if old:
        release = release or old[0][0]
        conn.execute(f"DELETE FROM {table} WHERE version = ?", (version,))
    at: Any = datetime.fromtimestamp(now, UTC)
    if not conn.pg:
        at = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    conn.execute(f"INSERT INTO {table} (version, name, phase, checksum, applied_at, duration_ms, release, state, "
                 "failed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (version, name, phase, checksum, at, duration_ms, release, state, failed))


def set_state(conn: Conn, table: str, version: str, state: str, position: str | None,
              add_ms: int = 0, failed: str | None = None) -> None:
    conn.execute(f"UPDATE {table} SET state = ?, backfill_position = ?, duration_ms = duration_ms + ?, "
                 "failed = ? WHERE version = ?", (state, position, add_ms, failed, version))


def revert(conn: Conn, table: str, version: str) -> None:
    """Rolled back: keep the row (and its release tag) as `reverted`."""
    conn.execute(f"UPDATE {table} SET state = ?, backfill_position = NULL, failed = NULL WHERE version = ?",
                 (REVERTED, version))


def delete(conn: Conn, table: str, version: str) -> None:
    conn.execute(f"DELETE FROM {table} WHERE version = ?", (version,))


def set_checksum(conn: Conn, table: str, version: str, checksum: str) -> None:
    conn.query(f"UPDATE {table} SET checksum = ? WHERE version = ?", (checksum, version))


# -- the history against the files ----------------------------------------------------------------
def verify(migrations: list[Migration], applied: dict[str, Applied]) -> None:
    """Applied files must not have changed (a dirty one may: its fix is accepted by repair)."""
    bad = [(m, applied[m.key]) for m in migrations
           if m.key in applied and applied[m.key].checksum != m.checksum and applied[m.key].state != DIRTY]
    if bad:
        lines = [f"{m.up.path}: changed after it was applied (sha256 {h.checksum[:12]} recorded, "
                 f"{m.checksum[:12]} now)" for m, h in bad]
        raise ChecksumMismatch("; ".join(lines) + " — restore the file(s), or run `changeover migrate repair` "
                               "to accept the change deliberately")


def refuse_dirty(applied: dict[str, Applied]) -> None:
    dirty = [h for h in applied.values() if h.state == DIRTY]
    if dirty:
        raise MigrationError("; ".join(f"{h.id} is dirty ({h.failed})" for h in dirty) +
                             " — nothing was run: finish or undo its statements by hand, then run `changeover "
                             "migrate repair --dirty applied` (all its changes are in place) or `--dirty pending` "
                             "(none are: the next run applies it again)")


def check_order(ms: list[Migration], applied: dict[str, Applied], where: str, allow: bool) -> None:
    """A new migration older than the newest applied one, and an applied one whose file is gone, are
    mistakes more often than not (a merge, the wrong directory): refuse unless accepted.
    where: the directory read, and why that one."""
    if allow or not applied:
        return
    on_disk = {m.key for m in ms}
    newest = max(applied.values(), key=lambda h: version_key(h.version))
    problems = []
    gone = [h for k, h in applied.items() if k not in on_disk]
    if gone:
        problems.append(f"applied but missing from {where}: " + ", ".join(
            h.id + (f" (release {h.release})" if h.release else "") for h in gone) +
            " — restore the files, or read the directory that has them (--release-dir)")
    early = [m for m in ms if m.key not in applied and version_key(m.version) < version_key(newest.version)]
    if early:
        problems.append(f"pending but older than {newest.id}, the newest applied migration (out of order): "
                        + ", ".join(m.id for m in early))
    if problems:
        raise MigrationError("; ".join(problems) + " — nothing was run; pass --allow-out-of-order to accept this "
                             "deliberately")
