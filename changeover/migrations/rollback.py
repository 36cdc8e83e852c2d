"""Rollback: down scripts newest first, each in its own transaction with its history row.

Everything is checked before anything is undone, so a refusal never comes halfway through a run:
the running releases' needs (releases.py), then every down script (it exists, it parses, it would
destroy data only with allow_data_loss). `--to VERSION` leaves VERSION applied; `--all` undoes
everything (version 0 included).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import LintFailed, MigrationError, UsageError
from changeover.migrations import engine, formats, history, releases
from changeover.migrations.formats import Migration, norm, version_key
from changeover.migrations.lint import LintContext, ScriptAnalysis, analyze
from changeover.migrations.lock import runner_lock
from changeover.migrations.results import RollbackResult
from changeover.migrations.source import database_for, discover

if TYPE_CHECKING:
    from changeover.config import Config

Progress = Callable[[str], None] | None


def _targets(applied: dict[str, history.Applied], steps: int | None, to: str | None, everything: bool) -> list[str]:
    """Versions to undo, newest first. --to VERSION leaves VERSION applied; --all undoes everything."""
    done = sorted(applied, key=version_key, reverse=True)
    if everything:
        return done
    if to is not None:  # --to 0 with no version 0 applied: everything newer than 0, i.e. all
        if norm(to) not in applied and norm(to) != "0":
            raise UsageError(f"version {to} is not applied (applied: {', '.join(done) or 'none'}); --to VERSION "
                             "undoes everything newer than VERSION and leaves it applied; --all undoes everything")
        return [k for k in done if version_key(k) > version_key(to)]
    return done[:steps or 1]


def _refuse_needed(config: Config, targets: list[history.Applied], leaving: str | None) -> None:
    """A running (live or standby) release needs what it applied and what was there at its deploy."""
    gone = releases.leaving(config) | ({leaving} if leaving else set())
    running = [r for r in releases.running(config) if r.version not in gone]
    problems = []
    for h in targets:
        for r in releases.needed_by(h, running):
            how = "applied it" if h.release == r.version else "was deployed after it was applied"
            problems.append(f"{h.id}: release {r.version} ({r.role}, slot {r.slot}) {how}")
    if problems:
        raise MigrationError("refusing to roll back migrations that a running release needs (nothing was rolled "
                             "back): " + "; ".join(problems) + " — roll the code back first (`changeover "
                             "rollback`), or pass --force if you know that release does not use them")


def rollback(config: Config, steps: int | None = None, to: str | None = None, *, everything: bool = False,
             allow_data_loss: bool = False, force: bool = False, leaving: str | None = None,
             progress: Progress = None, wait: bool = False, release_dir: str | Path | None = None,
             database_url: str | None = None) -> RollbackResult:
    """Run down scripts newest first, each in its own transaction with its history row.

    Everything is checked before anything is undone: the running releases' needs (unless force;
    `leaving` names a release being rolled back away from), and every down script (exists, parses,
    would destroy data only with allow_data_loss)."""
    if sum(x is not None for x in (steps, to)) + everything > 1:
        raise UsageError("pass one of --steps, --to and --all")
    if steps is not None and steps < 1:
        raise UsageError("--steps must be at least 1")
    if to is not None and not formats.VERSION.match(to):
        raise UsageError(f"--to expects a version number, got {to!r}")
    cfg = config.migrations
    db = database_for(config, database_url)
    src, ms = discover(config, release_dir)
    by_key = {m.key: m for m in ms}
    result = RollbackResult()
    with runner_lock(db, wait=wait, on_wait=progress):
        conn = db.connect("rollback", cfg.lock_timeout)
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            history.verify(ms, applied)
            history.refuse_dirty(applied)
            targets = _targets(applied, steps, to, everything)
            if not targets:
                return result
            if not force:
                _refuse_needed(config, [applied[k] for k in targets], leaving)
            problems: list[str] = []
            parse_errors = False
            plans: list[tuple[Migration, ScriptAnalysis]] = []
            for k in targets:
                m = by_key.get(k)
                if m is None:
                    problems.append(f"{applied[k].id} is applied but its file is gone from {src.dir} "
                                    f"({src.origin})")
                    continue
                if m.down is None:
                    problems.append(f"{m.id} has no down script: it cannot be rolled back")
                    continue
                a = analyze(m.down, LintContext(db.dialect))
                syntax = [(f.line, f.col, f.message) for f in [a.parse_error] if f is not None]
                syntax += [(st.line, st.col, err) for st in a.statements if st.node is None
                           for err in [conn.syntax_error(st.sql)] if err]   # SQLite pglast cannot read
                if syntax:
                    problems += [f"{m.down.path}:{line}:{col}: syntax error: {msg}" for line, col, msg in syntax]
                    parse_errors = True
                    continue
                lost = engine.data_loss(conn, a)
                if lost and not allow_data_loss:
                    problems.append(f"rolling back {m.id} would destroy data ({', '.join(lost)} hold values); "
                                    "pass --allow-data-loss to do it anyway")
                plans.append((m, a))
            if problems:
                err = LintFailed if parse_errors else MigrationError
                raise err("; ".join(problems) + f" — nothing was rolled back (checked {len(targets)} "
                          "down scripts first)")
            for m, a in plans:
                result.rolled_back.append(engine.named(m, partial(engine.revert, conn, cfg, m, a, progress)))
        finally:
            conn.close()
    return result
