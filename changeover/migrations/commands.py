"""The migrate verbs as plain functions, config first (Alembic style), returning result objects.

The deploy pipeline calls `safe(config, release, progress)` before switching traffic and
`contract(config, ..., older_release_live=False)` once the old slot is gone; the CLI is a thin
layer over the same functions. Every error is a ChangeoverError subclass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import ChecksumMismatch, LintFailed, MigrationError, UsageError
from changeover.migrations import engine, formats, history
from changeover.migrations.db import Database, database
from changeover.migrations.formats import Migration, Script
from changeover.migrations.lint import Finding, LintContext, ScriptAnalysis, analyze
from changeover.migrations.lock import runner_lock
from changeover.migrations.results import (
    ApplyResult,
    LintResult,
    MigrationStatus,
    PlannedMigration,
    PlanResult,
    RollbackResult,
    StatusResult,
    Stop,
)
from changeover.migrations.sqltext import POSTGRES

if TYPE_CHECKING:
    from changeover.config import Config

Progress = Callable[[str], None] | None
OlderLive = bool | None | Callable[[], bool | None]


# -- shared plumbing ----------------------------------------------------------------------------
def _db(config: Config) -> Database:
    return database(config.migrations.database, config.root)


def _dir(config: Config) -> Path:
    return (config.root / config.migrations.dir).resolve()


def _analyses(migrations: list[Migration], dialect: str) -> dict[str, ScriptAnalysis]:
    """Lint every up script in order, so later migrations see what earlier ones created."""
    ctx = LintContext(dialect)
    return {m.version: analyze(m.up, ctx) for m in migrations}


def _key(version: str) -> str:
    return str(int(version))


def _verify(migrations: list[Migration], applied: dict[str, history.Applied]) -> None:
    bad = [(m, applied[_key(m.version)]) for m in migrations
           if _key(m.version) in applied and applied[_key(m.version)].checksum != m.checksum]
    if bad:
        lines = [f"{m.up.path}: changed after it was applied (sha256 {h.checksum[:12]} recorded, "
                 f"{m.checksum[:12]} now)" for m, h in bad]
        raise ChecksumMismatch("; ".join(lines) + " — restore the file(s), or run `changeover migrate repair` "
                               "to accept the change deliberately")


def _refuse_parse_errors(pending: list[Migration], analyses: dict[str, ScriptAnalysis]) -> None:
    errors = [analyses[m.version].parse_error for m in pending]
    found = [f for f in errors if f is not None]
    if found:
        raise LintFailed("; ".join(f"{f.file}:{f.line}:{f.col}: syntax error: {f.message}" for f in found))


def _older_live(value: OlderLive) -> bool | None:
    return value() if callable(value) else value


# -- verbs ----------------------------------------------------------------------------------------
def status(config: Config) -> StatusResult:
    db = _db(config)
    ms = formats.discover(_dir(config))
    analyses = _analyses(ms, db.dialect)
    conn = db.connect("status")
    try:
        applied = history.load(conn, config.migrations.table)
    finally:
        conn.close()
    out: list[MigrationStatus] = []
    on_disk = {_key(m.version) for m in ms}
    for m in ms:
        h = applied.get(_key(m.version))
        if h is None:
            out.append(MigrationStatus(m.version, m.name, "pending", analyses[m.version].phase))
        else:
            out.append(MigrationStatus(m.version, m.name, h.state, h.phase, h.checksum != m.checksum,
                                       h.applied_at, h.release))
    for k, h in applied.items():
        if k not in on_disk:
            out.append(MigrationStatus(h.version, h.name, "missing", h.phase, False, h.applied_at, h.release))
    out.sort(key=lambda s: int(s.version))
    return StatusResult(db.display, out)


def plan(config: Config) -> PlanResult:
    """Dry run: every pending statement with its lock, rewrite, phase and findings. Changes nothing."""
    db = _db(config)
    ms = formats.discover(_dir(config))
    analyses = _analyses(ms, db.dialect)
    conn = db.connect("plan")
    try:
        applied = history.load(conn, config.migrations.table)
    finally:
        conn.close()
    pending: list[PlannedMigration] = []
    stopped = False
    for m in ms:
        if _key(m.version) not in applied:
            a = analyses[m.version]
            action = "after-stop" if stopped else {"expand": "apply", "contract": "stop"}.get(a.phase, "refuse")
            stopped = stopped or action != "apply"
            pending.append(PlannedMigration(m, a, action))
    return PlanResult(db.display, db.dialect, pending)


def _run(config: Config, mode: str, release: str | None, progress: Progress, allow_unsafe: bool,
         wait: bool) -> ApplyResult:
    cfg = config.migrations
    db = _db(config)
    ms = formats.discover(_dir(config))
    analyses = _analyses(ms, db.dialect)
    result = ApplyResult(release=release)
    with runner_lock(db, wait=wait, on_wait=progress):
        conn = db.connect("run", cfg.lock_timeout)
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            _verify(ms, applied)
            for m in ms:  # an interrupted backfill is finished before anything else runs
                h = applied.get(_key(m.version))
                if h is not None and h.state == history.BACKFILLING:
                    result.applied.append(engine.apply(conn, cfg, m, analyses[m.version], release, progress, h))
            pending = [m for m in ms if _key(m.version) not in applied]
            _refuse_parse_errors(pending, analyses)
            if mode == "up" and not allow_unsafe:
                unsafe = [m for m in pending if analyses[m.version].phase == "unsafe"]
                if unsafe:
                    raise LintFailed("refusing unsafe migrations (nothing was applied): " + "; ".join(
                        _why(m, analyses[m.version]) for m in unsafe) + " — fix them following the recipes in "
                        "`changeover migrate plan`, or pass --allow-unsafe")
            for i, m in enumerate(pending):
                a = analyses[m.version]
                stop = _stop(mode, m, a)
                if stop is not None:
                    result.stopped_at = stop
                    result.pending = len(pending) - i
                    if progress:
                        progress(stop.reason)
                    break
                result.applied.append(engine.apply(conn, cfg, m, a, release, progress))
        finally:
            conn.close()
    return result


def _why(m: Migration, a: ScriptAnalysis) -> str:
    f = next((f for f in a.findings if f.phase == a.phase and not f.ignored), None)
    detail = f" ({f.file}:{f.line}:{f.col} [{f.rule}] {f.message})" if f else ""
    return f"{m.id} is {a.phase}{detail}"


def _stop(mode: str, m: Migration, a: ScriptAnalysis) -> Stop | None:
    if mode == "safe" and a.phase == "contract":
        return Stop(m.version, m.name, a.phase, f"stopped before {_why(m, a)}: it belongs after the old code "
                    "is gone — run `changeover migrate contract` once no older release is live")
    if mode in ("safe", "contract") and a.phase == "unsafe":
        return Stop(m.version, m.name, a.phase, f"stopped before {_why(m, a)}: it is not safe while the "
                    "application runs — rewrite it following `changeover migrate plan`, or run "
                    "`changeover migrate up --allow-unsafe` in a maintenance window")
    return None


def safe(config: Config, release: str | None = None, progress: Progress = None, *,
         wait: bool = False) -> ApplyResult:
    """Apply pending expand migrations (backward compatible with the running code); stop before the
    first contract or unsafe one and say so in `stopped_at`."""
    return _run(config, "safe", release, progress, False, wait)


def contract(config: Config, release: str | None = None, progress: Progress = None, *,
             older_release_live: OlderLive = None, force: bool = False, wait: bool = False) -> ApplyResult:
    """Apply pending expand and contract migrations, once no older release is live.

    older_release_live: True refuses; None (unknown) refuses unless force; False proceeds."""
    live = _older_live(older_release_live)
    if live:
        raise MigrationError("an older release is still live: contract migrations would break it — "
                             "finish the deploy (stop the old slot) first")
    if live is None and not force:
        raise MigrationError("cannot tell whether an older release is still live (no daemon state); "
                             "make sure the old code is gone, then pass --force")
    return _run(config, "contract", release, progress, False, wait)


def up(config: Config, release: str | None = None, progress: Progress = None, *, allow_unsafe: bool = False,
       wait: bool = False) -> ApplyResult:
    """Apply everything pending; unsafe migrations only with allow_unsafe."""
    return _run(config, "up", release, progress, allow_unsafe, wait)


def rollback(config: Config, steps: int | None = None, to: str | None = None, *, allow_data_loss: bool = False,
             progress: Progress = None, wait: bool = False) -> RollbackResult:
    """Run down scripts newest first, each in its own transaction with its history row."""
    if steps is not None and to is not None:
        raise UsageError("pass either --steps or --to, not both")
    if steps is not None and steps < 1:
        raise UsageError("--steps must be at least 1")
    if to is not None and not to.isdigit():
        raise UsageError(f"--to expects a version number, got {to!r}")
    cfg = config.migrations
    db = _db(config)
    ms = formats.discover(_dir(config))
    by_key = {_key(m.version): m for m in ms}
    result = RollbackResult()
    with runner_lock(db, wait=wait, on_wait=progress):
        conn = db.connect("rollback", cfg.lock_timeout)
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            _verify(ms, applied)
            done = sorted(applied, key=int, reverse=True)
            if to is not None:
                if int(to) != 0 and _key(to) not in applied:
                    raise UsageError(f"version {to} is not applied (applied: {', '.join(done) or 'none'})")
                targets = [k for k in done if int(k) > int(to)]
            else:
                targets = done[:steps or 1]
            if not targets:
                return result
            for k in targets:
                m = by_key.get(k)
                if m is None:
                    raise MigrationError(f"version {applied[k].version}_{applied[k].name} is applied but its "
                                         "file is gone: cannot roll it back")
                if m.down is None:
                    raise MigrationError(f"{m.id} has no down script: it cannot be rolled back")
            for k in targets:
                m = by_key[k]
                assert m.down is not None
                a = analyze(m.down, LintContext(db.dialect))
                if a.parse_error:
                    f = a.parse_error
                    raise LintFailed(f"{f.file}:{f.line}:{f.col}: syntax error: {f.message}")
                lost = engine.data_loss(conn, a)
                if lost and not allow_data_loss:
                    raise MigrationError(f"rolling back {m.id} would destroy data ({', '.join(lost)} hold "
                                         "values); pass --allow-data-loss to do it anyway")
                result.rolled_back.append(engine.revert(conn, cfg, m, a, progress))
        finally:
            conn.close()
    return result


def repair(config: Config) -> list[str]:
    """Accept changed files deliberately: record their current checksums. -> the versions fixed."""
    cfg = config.migrations
    db = _db(config)
    ms = formats.discover(_dir(config))
    fixed = []
    with runner_lock(db):
        conn = db.connect("repair")
        try:
            applied = history.load(conn, cfg.table)
            for m in ms:
                h = applied.get(_key(m.version))
                if h is not None and h.checksum != m.checksum:
                    history.set_checksum(conn, cfg.table, h.version, m.checksum)
                    fixed.append(m.id)
        finally:
            conn.close()
    return fixed


_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def new(config: Config, name: str) -> list[Path]:
    """Create an empty migration in the layout the directory already uses. -> the files created."""
    slug = re.sub(r"[\s-]+", "_", name.strip().lower())
    if not _NAME.match(slug):
        raise UsageError(f"migration name {name!r}: use letters, digits and _ (e.g. add_orders_status)")
    d = _dir(config)
    d.mkdir(parents=True, exist_ok=True)
    ms = formats.discover(d)
    layout = formats.detect_layout(ms)
    if (ms and len(ms[-1].version) >= 14) or (layout == formats.DBMATE and not ms):
        version = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    else:
        version = f"{(int(ms[-1].version) + 1) if ms else 1:04d}"
    up_body = ("-- changeover:phase expand\n-- Backward compatible changes only: the running release must "
               "keep working.\n\n")
    down_body = "-- Undo the up script.\n\n"
    if layout == formats.DIESEL:
        v = version if len(version) < 14 else f"{version[:4]}-{version[4:6]}-{version[6:8]}-{version[8:]}"
        p = d / f"{v}_{slug}"
        p.mkdir()
        files = [p / "up.sql", p / "down.sql"]
        files[0].write_text(up_body)
        files[1].write_text(down_body)
    elif layout == formats.DBMATE:
        files = [d / f"{version}_{slug}.sql"]
        files[0].write_text(f"-- migrate:up\n{up_body}\n-- migrate:down\n{down_body}")
    else:
        files = [d / f"{version}_{slug}.up.sql", d / f"{version}_{slug}.down.sql"]
        files[0].write_text(up_body)
        files[1].write_text(down_body)
    return files


def lint(config: Config | None, paths: list[str] | None = None, dialect: str | None = None) -> LintResult:
    """Lint migration files or directories (default: the configured migrations directory)."""
    t0 = time.perf_counter()
    if dialect is None:
        dialect = POSTGRES
        if config is not None and config.migrations.database:
            dialect = _db(config).dialect
    scripts: list[Script] = []
    targets = [Path(p) for p in paths] if paths else ([_dir(config)] if config is not None else [])
    if not targets:
        raise UsageError("nothing to lint: pass PATHS or a config with [migrations] dir")
    for t in targets:
        if t.is_dir():
            scripts += [m.up for m in formats.discover(t)]
        elif t.is_file():
            text = t.read_text(encoding="utf-8", errors="replace")
            if "migrate:up" in text:
                scripts.append(formats.split_dbmate(t, text)[0])
            else:
                scripts.append(formats.script(t, text))
        else:
            raise UsageError(f"{t}: no such file or directory")
    ctx = LintContext(dialect)
    findings: list[Finding] = []
    for s in scripts:
        findings += analyze(s, ctx).findings
    return LintResult(len(scripts), ctx.statements, findings, time.perf_counter() - t0)
