"""What a failed CREATE INDEX CONCURRENTLY leaves behind, and cleaning it up.

A concurrent build that fails (a lock timeout while it waits for older transactions, a duplicate
key) leaves an INVALID index: it slows every write and is never used. Before each attempt the
engine drops the one a failed earlier attempt left, so `IF NOT EXISTS` cannot mistake it for
done. A named index is found by its name. An unnamed one gets a new name per attempt (`t_c_idx`,
`t_c_idx1`, ...): its leftovers are the INVALID indexes that appeared on the table since the first
attempt, and, once a build succeeds, INVALID indexes with the same definition (from earlier runs).

The DROP INDEX CONCURRENTLY waits for the same lockers as the build, so it may time out too: its
errors are raised raw, for the retry loop to treat like the build's own lock timeout.
"""

from __future__ import annotations

import re
from typing import Any

from changeover.migrations.db import Conn

_NAME = re.compile(r'INDEX (?:CONCURRENTLY )?(?:IF NOT EXISTS )?(?:"(?:[^"]|"")*"|\S+) ON ')


def _definition(indexdef: str) -> str:
    """pg_get_indexdef without the index's own name, to compare two indexes."""
    return _NAME.sub("INDEX ON ", str(indexdef), count=1)


class IndexBuild:
    """One CREATE INDEX CONCURRENTLY statement of a migration and its INVALID leftovers."""

    def __init__(self, conn: Conn, node: Any) -> None:
        rel = node.relation
        self.conn = conn
        self.schema = rel.schemaname
        self.table = f"{rel.schemaname}.{rel.relname}" if rel.schemaname else str(rel.relname)
        self.name: str | None = None
        if node.idxname:
            self.name = f"{rel.schemaname}.{node.idxname}" if rel.schemaname else str(node.idxname)
        self.before = self._indexes(valid=None)   # every index on the table before the first attempt
        self.dropped: list[str] = []

    def _indexes(self, valid: bool | None) -> set[str]:
        cond = "" if valid is None else (" AND i.indisvalid" if valid else " AND NOT i.indisvalid")
        rows = self.conn.execute("SELECT i.indexrelid::regclass::text FROM pg_index i "
                                 f"WHERE i.indrelid = to_regclass(?){cond}", (self.table,))
        return {str(r[0]) for r in rows}

    def leftovers(self) -> list[str]:
        """INVALID indexes this statement left (named: by name; unnamed: new since the first attempt)."""
        if self.name is not None:
            rows = self.conn.execute("SELECT indexrelid::regclass::text FROM pg_index "
                                     "WHERE indexrelid = to_regclass(?) AND NOT indisvalid", (self.name,))
            return [str(r[0]) for r in rows]
        return sorted(self._indexes(valid=False) - self.before)

    def drop_leftovers(self) -> None:
        """Raw errors: a lock timeout here is retried by the caller like the build's own."""
        for name in self.leftovers():
            self.conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            self.dropped.append(name)

    def drop_duplicates(self) -> None:
        """After an unnamed build succeeded: drop INVALID indexes of the same definition (from failed
        earlier runs, whose names this run cannot know)."""
        if self.name is not None:
            return
        new = self._indexes(valid=True) - self.before
        defs = {_definition(r[0]) for n in new
                for r in self.conn.execute("SELECT pg_get_indexdef(to_regclass(?))", (n,))}
        for name in sorted(self._indexes(valid=False)):
            row = self.conn.execute("SELECT pg_get_indexdef(to_regclass(?))", (name,))
            if row and _definition(row[0][0]) in defs:
                self.conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                self.dropped.append(name)
