"""The linter over a whole run of migrations, as `plan`, `lint` and the deploy's gate use it.

Every up script is analysed in order with one LintContext, so later migrations see what earlier
ones created. With a connection to the database the migrations will run on, table sizes come
from it for the *pending* migrations only (applied ones are analysed for the schema they left,
and need no catalog queries): a table it lacks is new for the rest of the run, an empty table
makes lock findings notices, and EXPLAIN estimates the rows of an unbatched UPDATE/DELETE.

Down scripts are linted too, each against the schema its up script left. A rollback undoes on
purpose (drops, renames back; the data-loss check guards it when it runs), so phase findings do
not apply to them; what they lock or rewrite is reported as a warning, and a down script that does
not parse is an error — it would fail exactly when it is needed.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import replace
from typing import Any

from changeover.migrations.analysis import DEFAULT_BACKFILL_THRESHOLD, Finding, LintContext, ScriptAnalysis
from changeover.migrations.db import Conn
from changeover.migrations.formats import Migration, Script
from changeover.migrations.lint import analyze
from changeover.migrations.sizes import Sizes

__all__ = ["DEFAULT_BACKFILL_THRESHOLD", "analyse_run", "context", "down_findings", "threshold"]

# what a rollback does on purpose: not findings for a down script
_PHASE_RULES = frozenset({"dropping-column", "dropping-table", "dropping-object", "dropping-constraint",
                          "dropping-default", "renaming-column", "renaming-table", "renaming-object",
                          "phase-mismatch"})


def threshold(migrations_config: Any) -> int:
    """[migrations] backfill_threshold (rows), read so this works before the key exists."""
    return int(getattr(migrations_config, "backfill_threshold", DEFAULT_BACKFILL_THRESHOLD))


def context(dialect: str, conn: Conn | None = None, backfill_threshold: int = DEFAULT_BACKFILL_THRESHOLD
            ) -> LintContext:
    ctx = LintContext(dialect, backfill_threshold=backfill_threshold)
    if conn is not None and conn.pg:
        ctx.sizes = Sizes(conn)
    return ctx


def analyse_run(migrations: list[Migration], dialect: str, conn: Conn | None = None,
                applied: Container[str] = (), backfill_threshold: int = DEFAULT_BACKFILL_THRESHOLD
                ) -> dict[str, ScriptAnalysis]:
    """Analyses of every up script, by version. `applied`: Migration.key of the applied ones; with
    `conn`, the pending ones are judged against that database's tables."""
    ctx = context(dialect, conn, backfill_threshold)
    sizes, ctx.sizes = ctx.sizes, None
    out = {}
    for m in migrations:
        if m.key not in applied:
            ctx.sizes = sizes
        out[m.version] = analyze(m.up, ctx)
    return out


def down_findings(script: Script, ctx: LintContext) -> tuple[int, list[Finding]]:
    """Lint a down script against a snapshot of `ctx`. -> (statements, findings)."""
    snap = ctx.snapshot()
    a = analyze(script, snap)
    out = []
    for f in a.findings:
        if f.rule in _PHASE_RULES:
            continue
        severity = "error" if f.rule == "parse-error" else "warning" if f.severity == "error" else f.severity
        out.append(replace(f, severity=severity, phase="expand" if severity != "error" else f.phase,
                           message=f"rollback: {f.message}"))
    return snap.statements, out
