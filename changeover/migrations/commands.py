"""The migrate verbs as plain functions, config first (Alembic style), returning result objects.

The deploy pipeline calls `safe(config, release=..., release_dir=..., database_url=...,
refuse_unsafe=True)` before switching traffic and `contract(config, ..., older_release_live=False)`
once the old slot is gone; the CLI is a thin layer over the same functions. Every error is a
ChangeoverError subclass.

Where migrations are read from (`source`): `[migrations] dir`, relative to the config file's
directory; with `{release}` in it, from the release directory given (the deploy's), or else the
live release's directory in the daemon's state. The database is `[migrations] database` unless the
caller passes `database_url` (the deploy passes the release's own DATABASE_URL).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import LintFailed, MigrationError, UsageError
from changeover.migrations import engine, formats, history, judge
from changeover.migrations import source as source_mod
from changeover.migrations.db import Database, database
from changeover.migrations.formats import Migration, Script, norm, version_key
from changeover.migrations.lint import Finding, LintContext, ScriptAnalysis, analyze
from changeover.migrations.lock import runner_lock
from changeover.migrations.repair import DIRTY_CHOICES, baseline, repair
from changeover.migrations.results import (
    ApplyResult,
    LintResult,
    MigrationStatus,
    PlannedMigration,
    PlanResult,
    StatusResult,
    Stop,
)
from changeover.migrations.rollback import rollback
from changeover.migrations.source import Source, enabled, source
from changeover.migrations.sqltext import POSTGRES

__all__ = ["DIRTY_CHOICES", "Source", "baseline", "contract", "enabled", "lint", "new", "plan", "repair",
           "rollback", "safe", "source", "status", "up"]

if TYPE_CHECKING:
    from changeover.config import Config

Progress = Callable[[str], None] | None
OlderLive = bool | None | Callable[[], bool | None]


# -- shared plumbing ----------------------------------------------------------------------------
def _db(config: Config, database_url: str | None = None) -> Database:
    return source_mod.database_for(config, database_url)


def _dir(config: Config, release_dir: str | Path | None = None) -> Path:
    return source_mod.source(config, release_dir).dir


def _discover(config: Config, release_dir: str | Path | None = None) -> tuple[Source, list[Migration]]:
    return source_mod.discover(config, release_dir)


def _analyses(migrations: list[Migration], dialect: str) -> dict[str, ScriptAnalysis]:
    """Lint every up script in order, so later migrations see what earlier ones created."""
    ctx = LintContext(dialect)
    return {m.version: analyze(m.up, ctx) for m in migrations}


def _key(version: str) -> str:
    return norm(version)


def _refuse_parse_errors(pending: list[Migration], analyses: dict[str, ScriptAnalysis]) -> None:
    errors = [analyses[m.version].parse_error for m in pending]
    found = [f for f in errors if f is not None]
    if found:
        raise LintFailed("; ".join(f"{f.file}:{f.line}:{f.col}: syntax error: {f.message}" for f in found))


def _older_live(value: OlderLive) -> bool | None:
    return value() if callable(value) else value


# -- verbs ----------------------------------------------------------------------------------------
def status(config: Config, *, release_dir: str | Path | None = None,
           database_url: str | None = None) -> StatusResult:
    db = _db(config, database_url)
    src, ms = _discover(config, release_dir)
    analyses = _analyses(ms, db.dialect)
    conn = db.connect("status")
    try:
        applied = history.load(conn, config.migrations.table)
    finally:
        conn.close()
    out: list[MigrationStatus] = []
    on_disk = {m.key for m in ms}
    for m in ms:
        h = applied.get(m.key)
        if h is None:
            out.append(MigrationStatus(m.version, m.name, "pending", analyses[m.version].phase))
        else:
            out.append(MigrationStatus(m.version, m.name, h.state, h.phase, h.checksum != m.checksum,
                                       h.applied_at, h.release, h.failed))
    for k, h in applied.items():
        if k not in on_disk:
            out.append(MigrationStatus(h.version, h.name, "missing", h.phase, False, h.applied_at, h.release,
                                       h.failed))
    out.sort(key=lambda s: version_key(s.version))
    return StatusResult(db.display, out, str(src.dir), src.origin)


def plan(config: Config, *, release_dir: str | Path | None = None, database_url: str | None = None) -> PlanResult:
    """Dry run: every pending statement with its lock, rewrite, phase and findings, judged against the
    database's tables (sizes from pg_class, row estimates from EXPLAIN). Changes nothing."""
    db = _db(config, database_url)
    _, ms = _discover(config, release_dir)
    conn = db.connect("plan")
    try:
        applied = history.load(conn, config.migrations.table)
        analyses = judge.analyse_run(ms, db.dialect, conn, applied, judge.threshold(config.migrations))
    finally:
        conn.close()
    pending: list[PlannedMigration] = []
    stopped = False
    for m in ms:
        if m.key not in applied:
            a = analyses[m.version]
            action = "after-stop" if stopped else {"expand": "apply", "contract": "stop"}.get(a.phase, "refuse")
            stopped = stopped or action != "apply"
            pending.append(PlannedMigration(m, a, action))
    return PlanResult(db.display, db.dialect, pending)


def _run(config: Config, mode: str, release: str | None, progress: Progress, allow_unsafe: bool, wait: bool, *,
         release_dir: str | Path | None = None, database_url: str | None = None, refuse_unsafe: bool = False,
         allow_out_of_order: bool = False) -> ApplyResult:
    cfg = config.migrations
    db = _db(config, database_url)
    src, ms = _discover(config, release_dir)
    result = ApplyResult(release=release, source=str(src.dir))
    with runner_lock(db, wait=wait, on_wait=progress):
        conn = db.connect("run", cfg.lock_timeout)
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            # judged as `plan` judges them: against this database's tables (an empty one is no risk)
            analyses = judge.analyse_run(ms, db.dialect, conn, applied, judge.threshold(cfg))
            history.verify(ms, applied)
            history.refuse_dirty(applied)
            history.check_order(ms, applied, f"{src.dir} ({src.origin})", allow_out_of_order)
            for m in ms:  # an interrupted backfill is finished before anything else runs
                h = applied.get(m.key)
                if h is not None and h.state == history.BACKFILLING:
                    a = analyses[m.version]
                    result.applied.append(engine.named(m, partial(engine.apply, conn, cfg, m, a, release, progress,
                                                                  h)))
            pending = [m for m in ms if m.key not in applied]
            _refuse_parse_errors(pending, analyses)
            if (mode == "up" and not allow_unsafe) or (mode == "safe" and refuse_unsafe):
                unsafe = [m for m in pending if analyses[m.version].phase == "unsafe"]
                if unsafe:
                    hint = ("fix them following the recipes, or pass --allow-unsafe" if mode == "up" else
                            "the deploy stops here: fix them following the recipes, or apply them in a "
                            "maintenance window with `changeover migrate up --allow-unsafe`")
                    raise LintFailed("refusing unsafe migrations (nothing was applied): " + "; ".join(
                        _why(m, analyses[m.version], recipe=True) for m in unsafe) + f" — {hint}")
            done = 0
            for i, m in enumerate(pending):
                a = analyses[m.version]
                stop = _stop(mode, m, a)
                if stop is not None:  # said once, by the caller (the CLI prints the result)
                    result.stopped_at = stop
                    result.pending = len(pending) - i
                    break
                result.applied.append(engine.named(m, partial(engine.apply, conn, cfg, m, a, release, progress)))
                done += 1
            result.contract_pending = [m.id for m in pending[done:] if analyses[m.version].phase == "contract"]
        finally:
            conn.close()
    return result


def _why(m: Migration, a: ScriptAnalysis, recipe: bool = False) -> str:
    f = next((f for f in a.findings if f.phase == a.phase and not f.ignored), None)
    detail = f" ({f.file}:{f.line}:{f.col} [{f.rule}] {f.message})" if f else ""
    if f and recipe:
        detail += f"; recipe: {f.recipe}"
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
         release_dir: str | Path | None = None, database_url: str | None = None, refuse_unsafe: bool = False,
         wait: bool = False, allow_out_of_order: bool = False) -> ApplyResult:
    """Apply pending expand migrations (backward compatible with the running code); stop before the
    first contract or unsafe one and say so in `stopped_at`; `contract_pending` lists the contract
    migrations left for `migrate contract`.

    refuse_unsafe (the deploy): an unsafe pending migration raises LintFailed with its finding and
    recipe, before anything is applied."""
    return _run(config, "safe", release, progress, False, wait, release_dir=release_dir,
                database_url=database_url, refuse_unsafe=refuse_unsafe, allow_out_of_order=allow_out_of_order)


def contract(config: Config, release: str | None = None, progress: Progress = None, *,
             older_release_live: OlderLive = None, force: bool = False, wait: bool = False,
             release_dir: str | Path | None = None, database_url: str | None = None,
             allow_out_of_order: bool = False) -> ApplyResult:
    """Apply pending expand and contract migrations, once no older release is live.

    older_release_live: True refuses; None (unknown) refuses unless force; False proceeds."""
    live = _older_live(older_release_live)
    if live:
        raise MigrationError("an older release is still live: contract migrations would break it — "
                             "finish the deploy (stop the old slot) first")
    if live is None and not force:
        raise MigrationError("cannot tell whether an older release is still live (no daemon state); "
                             "make sure the old code is gone, then pass --force")
    return _run(config, "contract", release, progress, False, wait, release_dir=release_dir,
                database_url=database_url, allow_out_of_order=allow_out_of_order)


def up(config: Config, release: str | None = None, progress: Progress = None, *, allow_unsafe: bool = False,
       wait: bool = False, release_dir: str | Path | None = None, database_url: str | None = None,
       allow_out_of_order: bool = False) -> ApplyResult:
    """Apply everything pending; unsafe migrations only with allow_unsafe."""
    return _run(config, "up", release, progress, allow_unsafe, wait, release_dir=release_dir,
                database_url=database_url, allow_out_of_order=allow_out_of_order)


_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def new(config: Config, name: str, *, release_dir: str | Path | None = None) -> list[Path]:
    """Create an empty migration in the layout the directory already uses. -> the files created."""
    slug = re.sub(r"[\s-]+", "_", name.strip().lower())
    if not _NAME.match(slug):
        raise UsageError(f"migration name {name!r}: use letters, digits and _ (e.g. add_orders_status)")
    d = _dir(config, release_dir)
    d.mkdir(parents=True, exist_ok=True)
    ms = formats.discover(d)
    layout = formats.detect_layout(ms)
    if (ms and len(ms[-1].version) >= 14) or (layout == formats.DBMATE and not ms):
        version = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    elif layout == formats.FLYWAY:
        version = str(version_key(ms[-1].version)[0] + 1)
    else:
        version = f"{(version_key(ms[-1].version)[0] + 1) if ms else 1:04d}"
    up_body = ("-- changeover:phase expand\n-- Backward compatible changes only: the running release must "
               "keep working.\n\n")
    down_body = "-- Undo the up script.\n\n"
    if layout == formats.DIESEL:
        v = version if len(version) < 14 else f"{version[:4]}-{version[4:6]}-{version[6:8]}-{version[8:]}"
        p = d / f"{v}_{slug}"
        p.mkdir()
        files = [p / "up.sql", p / "down.sql"]
    elif layout == formats.DBMATE:
        files = [d / f"{version}_{slug}.sql"]
        files[0].write_text(f"-- migrate:up\n{up_body}\n-- migrate:down\n{down_body}")
        return files
    elif layout == formats.FLYWAY:
        files = [d / f"V{version}__{slug}.sql", d / f"U{version}__{slug}.sql"]
    else:
        files = [d / f"{version}_{slug}.up.sql", d / f"{version}_{slug}.down.sql"]
    files[0].write_text(up_body)
    files[1].write_text(down_body)
    return files


def lint(config: Config | None, paths: list[str] | None = None, dialect: str | None = None, *,
         use_database: bool = False, database_url: str | None = None) -> LintResult:
    """Lint migration files or directories (default: the configured migrations directory), down
    scripts included. With database_url, or use_database (the configured one), statements are judged
    against that database's tables: sizes from pg_class, row estimates from EXPLAIN."""
    t0 = time.perf_counter()
    db = None
    if database_url or use_database:
        if database_url is None and (config is None or not config.migrations.database):
            raise UsageError("no database to read table sizes from: pass --database URL or configure "
                             "[migrations] database")
        db = database(database_url, Path.cwd()) if config is None else _db(config, database_url)
    if dialect is None:
        dialect = POSTGRES
        if db is not None:
            dialect = db.dialect
        elif config is not None and config.migrations.database:
            dialect = _db(config).dialect
    scripts: list[tuple[Script, Script | None]] = []   # (up, its down) or (a lone file, None)
    targets = [Path(p) for p in paths] if paths else ([_dir(config)] if config is not None else [])
    if not targets:
        raise UsageError("nothing to lint: pass PATHS or a config with [migrations] dir")
    for t in targets:
        if t.is_dir():
            scripts += [(m.up, m.down) for m in formats.discover(t)]
        elif t.is_file():
            text = t.read_text(encoding="utf-8", errors="replace")
            if "migrate:up" in text:
                scripts.append(formats.split_dbmate(t, text))
            else:
                scripts.append((formats.script(t, text), None))
        else:
            raise UsageError(f"{t}: no such file or directory")
    conn = db.connect("lint") if db is not None else None
    try:
        threshold = judge.threshold(config.migrations) if config is not None else judge.DEFAULT_BACKFILL_THRESHOLD
        ctx = judge.context(dialect, conn, threshold)
        findings: list[Finding] = []
        files = statements = 0
        for up, down in scripts:
            files += 1
            if up.path.name.endswith(".down.sql") or up.path.name == "down.sql":
                n, found = judge.down_findings(up, ctx)
                findings += found
                statements += n
                continue
            findings += analyze(up, ctx).findings
            if down is not None:
                n, found = judge.down_findings(down, ctx)
                findings += found
                statements += n
    finally:
        if conn is not None:
            conn.close()
    return LintResult(files, ctx.statements + statements, findings, time.perf_counter() - t0)
