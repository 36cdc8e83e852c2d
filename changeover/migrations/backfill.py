"""Batched backfill: an UPDATE over a big table, run in primary-key batches.

Each batch is its own short transaction (with lock_timeout and retries), so no transaction ever
holds row locks on more than `batch` rows, and writers wait at most one batch. The key reached
is written to the history row in the same transaction as the batch, so an interrupted backfill
resumes exactly where it stopped; the UPDATE's own WHERE (`col IS NULL`) makes it idempotent too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pglast.parser import scan

from changeover.errors import MigrationError
from changeover.migrations import history
from changeover.migrations.db import Conn, qident
from changeover.migrations.retry import Policy, with_retries


@dataclass
class BackfillResult:
    table: str
    rows: int = 0
    batches: int = 0
    position: str | None = None


def split_where(sql: str) -> tuple[str, str | None]:
    """UPDATE text -> (text before the top-level WHERE, the condition or None)."""
    depth, where = 0, None
    for tok in scan(sql):
        if tok.name == "ASCII_40":
            depth += 1
        elif tok.name == "ASCII_41":
            depth -= 1
        elif depth == 0 and tok.name == "RETURNING":
            raise MigrationError("a backfill UPDATE cannot have RETURNING")
        elif depth == 0 and tok.name == "WHERE" and where is None:
            where = tok
    if where is None:
        return sql, None
    return sql[:where.start], sql[where.end + 1:]


def _position(value: str | None) -> Any:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def run(conn: Conn, sql: str, node: Any, table: str, key: str | None, batch: int, pause: float,
        history_table: str, version: str, tag: int, start: str | None, timeouts: tuple[float, float], policy: Policy,
        progress: Callable[[str], None] | None) -> BackfillResult:
    key = key or conn.primary_key(table)
    if not key:
        raise MigrationError(f"backfill of {table}: it has no single-column primary key; "
                             "name one with `-- changeover:backfill table=... key=COLUMN`")
    alias = node.relation.alias.aliasname if node is not None and node.relation.alias else table
    k = f"{qident(alias)}.{qident(key)}" if key != "rowid" else f"{qident(alias)}.rowid"
    bare = qident(key) if key != "rowid" else "rowid"
    head, cond = split_where(sql)
    ph = "%s" if conn.pg else "?"
    if conn.pg:  # the statement gets parameters: literal % must be doubled for psycopg
        head, cond = head.replace("%", "%%"), cond.replace("%", "%%") if cond else None
    update = f"{head} WHERE {f'({cond}) AND ' if cond else ''}{k} > {ph} AND {k} <= {ph}"
    first = f"{head} WHERE {f'({cond}) AND ' if cond else ''}{k} <= {ph}"
    upper_sql = (f"SELECT max(k) FROM (SELECT {bare} AS k FROM {qident(table)} WHERE {bare} > ? "
                 f"ORDER BY {bare} LIMIT {int(batch)}) s")
    first_upper = (f"SELECT max(k) FROM (SELECT {bare} AS k FROM {qident(table)} "
                   f"ORDER BY {bare} LIMIT {int(batch)}) s")
    total_sql = f"SELECT min({bare}), max({bare}) FROM {qident(table)}"
    lo, hi = conn.query(total_sql)[0]
    res = BackfillResult(table, position=start)
    started = time.monotonic()

    def one_batch() -> tuple[Any, int]:
        conn.begin()
        conn.set_timeouts(*timeouts, local=True)
        last = _position(res.position)
        found = conn.execute(first_upper) if last is None else conn.execute(upper_sql, (last,))
        upper = found[0][0]
        if upper is None:
            conn.commit()
            return None, 0
        n = _rowcount(conn, first, (upper,)) if last is None else _rowcount(conn, update, (last, upper))
        history.set_state(conn, history_table, version, history.BACKFILLING, f"{tag}:{upper}")
        conn.commit()
        return upper, n

    while True:
        t0 = time.monotonic()
        (upper, n), _ = with_retries(one_batch, policy, f"backfill {table}", progress, conn.rollback)
        if upper is None:
            break
        res.position, res.rows, res.batches = str(upper), res.rows + n, res.batches + 1
        if progress and (res.batches == 1 or res.batches % 50 == 0 or time.monotonic() - t0 > 1):
            pct = ""
            if isinstance(upper, int) and isinstance(hi, int) and isinstance(lo, int) and hi > lo:
                pct = f" ({100 * (upper - lo) / (hi - lo):.1f}%)"
            progress(f"backfill {table}: {res.rows} rows in {res.batches} batches, {key} <= {upper}{pct}, "
                     f"{time.monotonic() - started:.1f}s")
        if pause:
            time.sleep(pause)
    if progress:
        progress(f"backfill {table}: done, {res.rows} rows in {res.batches} batches")
    return res


def _rowcount(conn: Conn, sql: str, params: tuple[Any, ...]) -> int:
    return int(conn.raw.execute(sql, params).rowcount)  # sql already has the driver's placeholders
