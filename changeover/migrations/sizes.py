"""What the database the migrations will run on says about the tables they touch.

Read lazily and cached, one small catalog query per table: the row estimate and size from
pg_class, and whether the table is empty. `reltuples` is only an estimate (-1 before the first
VACUUM/ANALYZE on PostgreSQL 14+, 0 when analysed empty and filled since), so "empty" — which turns
a lock error into a notice — is confirmed with an EXISTS probe that reads at most one row.
EXPLAIN estimates how many rows an UPDATE/DELETE touches; it runs in a transaction that is rolled
back, with a short lock_timeout, so planning never queues behind the application's locks.
"""

from __future__ import annotations

from typing import Any

import psycopg

from changeover.migrations.analysis import TableSize
from changeover.migrations.db import Conn, qident

_LOCK_TIMEOUT = "1s"


class Sizes:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._tables: dict[str, TableSize] = {}
        self._volatility: dict[str, str | None] = {}

    def _run(self, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]] | None:
        """One read-only probe in its own rolled-back transaction; None when the database refuses it."""
        try:
            self.conn.execute("BEGIN")
            self.conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            self.conn.execute(f"SET LOCAL statement_timeout = '{_LOCK_TIMEOUT}'")
            return self.conn.execute(sql, params)
        except psycopg.Error:
            return None
        finally:
            self.conn.rollback()

    def table(self, name: str) -> TableSize:
        if name not in self._tables:
            self._tables[name] = self._read(name)
        return self._tables[name]

    def _read(self, name: str) -> TableSize:
        rows = self._run("SELECT c.reltuples::bigint, pg_total_relation_size(c.oid) FROM pg_class c "
                         "WHERE c.oid = to_regclass(?)", (name,))
        if not rows:
            return TableSize(name, False, None)
        estimate, size = int(rows[0][0]), int(rows[0][1])
        if estimate < 1:  # never analysed, or analysed while empty: look
            probe = self._run(f"SELECT EXISTS (SELECT FROM {qident(name)})")
            if probe is not None:
                estimate = -1 if probe[0][0] else 0
        return TableSize(name, True, None if estimate < 0 else estimate, size)

    def estimate(self, sql: str) -> int | None:
        """Rows an UPDATE/DELETE would touch, by the planner; None when it cannot plan it (e.g. a column
        that an earlier statement of the same migration adds)."""
        rows = self._run(f"EXPLAIN (FORMAT JSON) {sql}")
        if not rows:
            return None
        doc = rows[0][0]
        plan = doc[0]["Plan"] if isinstance(doc, list) and doc else None
        if not isinstance(plan, dict):
            return None
        if plan.get("Node Type") == "ModifyTable" and plan.get("Plans"):
            plan = plan["Plans"][0]
        return int(plan.get("Plan Rows", 0))

    def volatility(self, function: str) -> str | None:
        """pg_proc.provolatile of a function name ('i', 's' or 'v'; the most volatile overload), or None."""
        if function not in self._volatility:
            rows = self._run("SELECT max(provolatile) FROM pg_proc WHERE proname = ?", (function,))
            self._volatility[function] = str(rows[0][0]) if rows and rows[0][0] else None
        return self._volatility[function]
