"""Retrying on lock timeouts (SQLSTATE 55P03, SQLite 'database is locked') with exponential backoff.

A DDL statement waiting for its lock blocks every later query on the table, so it waits at most
lock_timeout, gives up, lets the traffic through, and tries again later; a bounded number of times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from changeover.errors import MigrationError
from changeover.migrations.db import BlockerWatch, describe, is_lock_timeout

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    retries: int
    backoff: float
    backoff_max: float

    def pause(self, attempt: int) -> float:
        return float(min(self.backoff * (2 ** (attempt - 1)), self.backoff_max))


def with_retries(fn: Callable[[], T], policy: Policy, label: str,
                 progress: Callable[[str], None] | None, undo: Callable[[], None],
                 watch: Callable[[], BlockerWatch | None] | None = None) -> tuple[T, int]:
    """Run fn; on a lock timeout call undo (roll back), wait, and run it again. -> (result, attempts).

    watch: makes a BlockerWatch for the session; the last attempt (and any after a first timeout)
    runs under it, so that giving up can name who held the lock."""
    attempt = 1
    while True:
        watcher = watch() if watch is not None and (attempt > 1 or policy.retries == 0) else None
        try:
            if watcher is None:
                return fn(), attempt
            with watcher:
                return fn(), attempt
        except Exception as e:
            undo()
            if not is_lock_timeout(e):
                raise
            if attempt > policy.retries:
                who = watcher.describe() if watcher is not None else \
                    "a long transaction is probably holding it: find it in pg_stat_activity"
                raise MigrationError(f"{label}: could not get its lock after {attempt} attempts "
                                     f"({describe(e)}); {who}; or raise [migrations] retries") from None
            wait = policy.pause(attempt)
            if progress:
                progress(f"{label}: lock timeout (attempt {attempt}/{policy.retries + 1}), "
                         f"retrying in {wait:g}s")
            time.sleep(wait)
            attempt += 1
