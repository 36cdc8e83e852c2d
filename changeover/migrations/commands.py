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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from changeover.errors import ChecksumMismatch, LintFailed, MigrationError, UsageError
from changeover.migrations import engine, formats, history, judge, releases
from changeover.migrations.config import RELEASE_PLACEHOLDER
from changeover.migrations.db import Database, database
from changeover.migrations.formats import Migration, Script, norm, version_key
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
T = TypeVar("T")
DIRTY_CHOICES = ("applied", "pending")


# -- shared plumbing ----------------------------------------------------------------------------
def _db(config: Config, database_url: str | None = None) -> Database:
    return database(database_url or config.migrations.database, config.root)


@dataclass(frozen=True)
class Source:
    """The directory migrations are read from, and why that one (for errors and `status`)."""

    dir: Path
    origin: str


def source(config: Config, release_dir: str | Path | None = None) -> Source:
    cfg = config.migrations
    origin = (f'[migrations] dir = "{cfg.dir}" in {config.file}' if cfg.dir_explicit
              else f'the default [migrations] dir "{cfg.dir}" beside {config.file}')
    raw = cfg.dir
    if cfg.per_release:
        if release_dir is None:
            rel = releases.live(config)
            if rel is None:
                raise MigrationError(f"{origin} reads migrations from a release directory, and none was given: "
                                     f"no release is live in {releases.state_path(config)}; pass --release-dir DIR")
            release_dir = rel.path
            origin += f", release {rel.version} (live in {rel.slot})"
        else:
            origin += f", release directory {release_dir}"
        raw = raw.replace(RELEASE_PLACEHOLDER, str(release_dir))
    d = Path(raw)
    return Source((d if d.is_absolute() else config.root / d).resolve(), origin)


def _dir(config: Config, release_dir: str | Path | None = None) -> Path:
    return source(config, release_dir).dir


def _discover(config: Config, release_dir: str | Path | None) -> tuple[Source, list[Migration]]:
    src = source(config, release_dir)
    return src, formats.discover(src.dir, src.origin)


def enabled(config: Config, release_dir: str | Path | None = None, database_url: str | None = None) -> bool:
    """Does a deploy run migrations? It needs a database and a directory. A directory set in the
    config that does not exist is an error (a typo must not skip the migrations silently); the
    default `migrations/` may be absent."""
    if not (database_url or config.migrations.database):
        return False
    src = source(config, release_dir)
    if src.dir.is_dir():
        return True
    if config.migrations.dir_explicit:
        raise MigrationError(f"migrations directory {src.dir} ({src.origin}) does not exist")
    return False


def _analyses(migrations: list[Migration], dialect: str) -> dict[str, ScriptAnalysis]:
    """Lint every up script in order, so later migrations see what earlier ones created."""
    ctx = LintContext(dialect)
    return {m.version: analyze(m.up, ctx) for m in migrations}


def _key(version: str) -> str:
    return norm(version)


def _verify(migrations: list[Migration], applied: dict[str, history.Applied]) -> None:
    bad = [(m, applied[m.key]) for m in migrations
           if m.key in applied and applied[m.key].checksum != m.checksum and applied[m.key].state != history.DIRTY]
    if bad:
        lines = [f"{m.up.path}: changed after it was applied (sha256 {h.checksum[:12]} recorded, "
                 f"{m.checksum[:12]} now)" for m, h in bad]
        raise ChecksumMismatch("; ".join(lines) + " — restore the file(s), or run `changeover migrate repair` "
                               "to accept the change deliberately")


def _refuse_dirty(applied: dict[str, history.Applied]) -> None:
    dirty = [h for h in applied.values() if h.state == history.DIRTY]
    if dirty:
        raise MigrationError("; ".join(f"{h.id} is dirty ({h.failed})" for h in dirty) +
                             " — nothing was run: finish or undo its statements by hand, then run `changeover "
                             "migrate repair --dirty applied` (all its changes are in place) or `--dirty pending` "
                             "(none are: the next run applies it again)")


def _check_order(ms: list[Migration], applied: dict[str, history.Applied], src: Source, allow: bool) -> None:
    """A new migration older than the newest applied one, and an applied one whose file is gone, are
    mistakes more often than not (a merge, a wrong directory): say so unless accepted."""
    if allow or not applied:
        return
    on_disk = {m.key for m in ms}
    newest = max(applied.values(), key=lambda h: version_key(h.version))
    problems = []
    gone = [h for k, h in applied.items() if k not in on_disk]
    if gone:
        problems.append(f"applied but missing from {src.dir} ({src.origin}): " + ", ".join(
            h.id + (f" (release {h.release})" if h.release else "") for h in gone) +
            " — restore the files, or read the directory that has them (--release-dir)")
    early = [m for m in ms if m.key not in applied and version_key(m.version) < version_key(newest.version)]
    if early:
        problems.append(f"pending but older than {newest.id}, the newest applied migration (out of order): "
                        + ", ".join(m.id for m in early))
    if problems:
        raise MigrationError("; ".join(problems) + " — nothing was run; pass --allow-out-of-order to accept this "
                             "deliberately")


def _refuse_parse_errors(pending: list[Migration], analyses: dict[str, ScriptAnalysis]) -> None:
    errors = [analyses[m.version].parse_error for m in pending]
    found = [f for f in errors if f is not None]
    if found:
        raise LintFailed("; ".join(f"{f.file}:{f.line}:{f.col}: syntax error: {f.message}" for f in found))


def _older_live(value: OlderLive) -> bool | None:
    return value() if callable(value) else value


def _named(m: Migration, fn: Callable[[], T]) -> T:
    """Every error of a migration's run names the migration."""
    try:
        return fn()
    except MigrationError as e:
        if m.id in str(e):
            raise
        raise type(e)(f"{m.id}: {e}") from None


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
    analyses = _analyses(ms, db.dialect)
    result = ApplyResult(release=release, source=str(src.dir))
    with runner_lock(db, wait=wait, on_wait=progress):
        conn = db.connect("run", cfg.lock_timeout)
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            _verify(ms, applied)
            _refuse_dirty(applied)
            _check_order(ms, applied, src, allow_out_of_order)
            for m in ms:  # an interrupted backfill is finished before anything else runs
                h = applied.get(m.key)
                if h is not None and h.state == history.BACKFILLING:
                    a = analyses[m.version]
                    result.applied.append(_named(m, partial(engine.apply, conn, cfg, m, a, release, progress, h)))
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
                result.applied.append(_named(m, partial(engine.apply, conn, cfg, m, a, release, progress)))
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
    db = _db(config, database_url)
    src, ms = _discover(config, release_dir)
    by_key = {m.key: m for m in ms}
    result = RollbackResult()
    with runner_lock(db, wait=wait, on_wait=progress):
        conn = db.connect("rollback", cfg.lock_timeout)
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            _verify(ms, applied)
            _refuse_dirty(applied)
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
                result.rolled_back.append(_named(m, partial(engine.revert, conn, cfg, m, a, progress)))
        finally:
            conn.close()
    return result


def repair(config: Config, *, dirty: str | None = None, release_dir: str | Path | None = None,
           database_url: str | None = None) -> list[str]:
    """Accept changed files deliberately (record their current checksums), and resolve a dirty
    migration: dirty="applied" (its changes are all in place) or "pending" (none are). -> what was fixed."""
    if dirty is not None and dirty not in DIRTY_CHOICES:
        raise UsageError(f"--dirty expects applied or pending, got {dirty!r}")
    cfg = config.migrations
    db = _db(config, database_url)
    _, ms = _discover(config, release_dir)
    fixed = []
    with runner_lock(db):
        conn = db.connect("repair")
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            stuck = [h for h in applied.values() if h.state == history.DIRTY]
            if stuck and dirty is None:
                raise UsageError("; ".join(f"{h.id} is dirty ({h.failed})" for h in stuck) + " — look at the "
                                 "database, then choose: `changeover migrate repair --dirty applied` (its changes "
                                 "are all in place) or `--dirty pending` (none are: the next run applies it again)")
            if dirty is not None and not stuck:
                raise UsageError("no migration is dirty: nothing for --dirty to resolve")
            by_key = {m.key: m for m in ms}
            for h in stuck:
                conn.begin()
                if dirty == "applied":
                    history.set_state(conn, cfg.table, h.version, history.APPLIED, None)
                    fixed_file = by_key.get(norm(h.version))
                    if fixed_file is not None:  # the file may have been corrected since it failed
                        history.set_checksum(conn, cfg.table, h.version, fixed_file.checksum)
                else:
                    history.revert(conn, cfg.table, h.version)
                conn.commit()
                fixed.append(f"{h.id} (dirty, now {dirty})")
            for m in ms:
                row = applied.get(m.key)
                if row is not None and row.state != history.DIRTY and row.checksum != m.checksum:
                    history.set_checksum(conn, cfg.table, row.version, m.checksum)
                    fixed.append(m.id)
        finally:
            conn.close()
    return fixed


def baseline(config: Config, version: str, *, release: str | None = None, release_dir: str | Path | None = None,
             database_url: str | None = None) -> list[str]:
    """Adopt an existing database: record every migration up to VERSION as applied without running
    it (Flyway's baseline). Only on a database with no changeover history. -> the ids recorded."""
    if not formats.VERSION.match(version):
        raise UsageError(f"baseline expects a version number, got {version!r}")
    cfg = config.migrations
    db = _db(config, database_url)
    src, ms = _discover(config, release_dir)
    upto = [m for m in ms if version_key(m.version) <= version_key(version)]
    if not upto:
        raise UsageError(f"no migration in {src.dir} ({src.origin}) is at or before version {version}")
    analyses = _analyses(ms, db.dialect)
    with runner_lock(db):
        conn = db.connect("baseline")
        try:
            history.ensure(conn, cfg.table)
            applied = history.load(conn, cfg.table)
            if applied:
                newest = max(applied.values(), key=lambda h: version_key(h.version))
                raise MigrationError(f"{cfg.table} already records {len(applied)} applied migration(s) (newest "
                                     f"{newest.id}): baseline only adopts a database without changeover history "
                                     "— use `changeover migrate up`")
            conn.begin()
            try:
                for m in upto:
                    history.insert(conn, cfg.table, m.version, m.name, analyses[m.version].phase, m.checksum, 0,
                                   release)
                conn.commit()
            except engine.DB_ERRORS as e:
                conn.rollback()
                raise MigrationError(f"baseline failed, nothing was recorded: {e}") from None
        finally:
            conn.close()
    return [m.id for m in upto]


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
