"""Locks over a whole migration: a transactional migration holds every lock it takes until it commits.

So a slow statement (VALIDATE, an index build, a scan, an unbatched UPDATE) that follows a statement
taking a stronger lock runs with that stronger lock still held: `ADD CONSTRAINT ... NOT VALID` then
`VALIDATE CONSTRAINT` in one file blocks every reader and writer of the table for the whole
validation, although each statement alone is the safe recipe. Measured: a writer stalled 136 ms
with both in one migration against 10 ms as two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from changeover.migrations.analysis import HeldLock, StatementPlan
from changeover.migrations.rules import LOCK_BLOCKS, LOCK_RANK, blocks_writes
from changeover.migrations.sqltext import Statement

if TYPE_CHECKING:
    from changeover.migrations.lint import Analyzer

_NOT_HELD = ("none", "unknown", "ACCESS SHARE")


def analyse(a: Analyzer, plans: list[StatementPlan], split: list[Statement], transaction: bool) -> list[HeldLock]:
    """The strongest lock per table and how long it is held; adds slow-under-held-lock findings."""
    from changeover.migrations.lint import set_phase
    held: dict[str, HeldLock] = {}
    for p in plans:
        # a slow statement that is an error on its own is fixed first (and CONCURRENTLY ends the transaction)
        if transaction and p.slow and not any(f.severity == "error" and not f.ignored for f in p.findings):
            over = [h for h in held.values()
                    if LOCK_RANK.get(h.lock, 0) > LOCK_RANK.get(p.lock if h.table in p.tables else "none", 0)
                    and blocks_writes(h.lock)]
            if over:
                h = max(over, key=lambda h: LOCK_RANK.get(h.lock, 0))
                others = f" (and {len(over) - 1} more tables)" if len(over) > 1 else ""
                p.findings.append(a.finding(
                    "slow-under-held-lock", split[p.index - 1], p.index,
                    f"{p.slow} while {h.lock} on {h.table}{others}, taken by statement {h.since} (line {h.line}), "
                    f"is held until the migration commits: {LOCK_BLOCKS[h.lock]} of {h.table} wait for all of it"))
                set_phase(p)
        if p.lock in _NOT_HELD:
            continue
        for t in p.tables:
            if t in a.created or a.run_new(t):
                continue  # nobody else uses it yet
            cur = held.get(t)
            if cur is None or LOCK_RANK.get(p.lock, 0) > LOCK_RANK.get(cur.lock, 0):
                held[t] = HeldLock(t, p.lock, p.index, p.line, p.index)
    last = plans[-1].index if plans else 0
    return [HeldLock(h.table, h.lock, h.since, h.line, last if transaction else h.since) for h in held.values()]
