"""`changeover migrate ...`: a thin typer layer over commands.py.

Commands raise ChangeoverError subclasses; the main CLI turns them into `error: ...` and an exit
code. `--json` prints one JSON document on stdout; progress goes to stderr either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from changeover import config as config_mod
from changeover.errors import LintFailed

if TYPE_CHECKING:
    from changeover.migrations.engine import StepResult
    from changeover.migrations.results import ApplyResult

# The migration modules (psycopg, pglast) are imported by the commands that run them: every other
# `changeover` invocation would pay ~0.3 s for them.

app = typer.Typer(help="Safe, reversible database migrations (expand/contract).", no_args_is_help=True)

CONFIG = typer.Option(config_mod.DEFAULT_CONFIG, "-c", "--config", help="Path to changeover.toml.")
JSON = typer.Option(False, "--json", help="Print one JSON document.")
RELEASE = typer.Option(None, "--release", help="Release being deployed (recorded in the history).")
WAIT = typer.Option(False, "--wait", help="Wait for another migration run to finish instead of failing.")
RELEASE_DIR = typer.Option(None, "--release-dir", help="Release directory for a [migrations] dir with {release} "
                           "(default: the live release's).")
DATABASE = typer.Option(None, "--database", help="Database URL to use instead of [migrations] database.")
OUT_OF_ORDER = typer.Option(False, "--allow-out-of-order", help="Accept pending migrations older than the newest "
                            "applied one, and applied ones whose files are gone.")


def _progress(msg: str) -> None:
    typer.echo(msg, err=True)


def _emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def older_release_live(config: config_mod.Config) -> bool | None:
    """From the daemon's state (.changeover/state.db beside the config): is an older release still
    running? None when it cannot be told."""
    from changeover.migrations import releases
    return releases.older_release_live(config)


def _steps(title: str, steps: list[StepResult]) -> None:
    for s in steps:
        extra = f", backfilled {s.backfilled_rows} rows" if s.backfilled_rows else ""
        retry = f", {s.attempts} attempts" if s.attempts > 1 else ""
        typer.echo(f"{title} {s.version}_{s.name} ({s.phase}, {s.duration_ms} ms{retry}{extra})")
        for note in s.notes:
            typer.echo(f"  note: {note}")


def _apply_out(res: ApplyResult, as_json: bool) -> None:
    if as_json:
        _emit(res.to_json())
        return
    _steps("applied", res.applied)
    if not res.applied:
        typer.echo("nothing to apply" if not res.stopped_at else "nothing applied")
    if res.stopped_at:
        typer.echo(res.stopped_at.reason)
    elif res.contract_pending:
        typer.echo(f"contract pending: {', '.join(res.contract_pending)} (run `changeover migrate contract` once "
                   "no older release is live)")


@app.command()
def status(config: str = CONFIG, release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE,
           as_json: bool = JSON) -> None:
    """Applied and pending migrations, drift, interrupted backfills, dirty migrations."""
    from changeover.migrations import commands
    res = commands.status(config_mod.load(config), release_dir=release_dir, database_url=database)
    if as_json:
        _emit(res.to_json())
        return
    typer.echo(f"database: {res.database}")
    typer.echo(f"migrations: {res.source} ({res.origin})")
    for m in res.migrations:
        flag = "  CHANGED since applied (see `migrate repair`)" if m.drifted else ""
        rel = f"  release {m.release}" if m.release else ""
        typer.echo(f"{m.state:<12} {m.version}_{m.name}  [{m.phase}]{rel}{flag}")
        if m.failed:
            typer.echo(f"             {m.failed}  (resolve with `migrate repair --dirty applied|pending`)")
    typer.echo(f"{len(res.pending)} pending" + (f", {len(res.dirty)} dirty" if res.dirty else ""))


@app.command()
def plan(config: str = CONFIG, release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE,
         as_json: bool = JSON) -> None:
    """Dry run: each pending statement with its lock, rewrite, phase and lint findings, the locks each
    migration holds until it commits, and the sizes of the tables it touches."""
    from changeover.migrations import commands
    from changeover.migrations.rules import LOCK_BLOCKS
    res = commands.plan(config_mod.load(config), release_dir=release_dir, database_url=database)
    if as_json:
        _emit(res.to_json())
        return
    if not res.pending:
        typer.echo("nothing pending")
    for p in res.pending:
        m, a = p.migration, p.analysis
        tx = "" if a.transaction else ", statement by statement (no transaction)"
        would = {"apply": "apply it", "stop": "stop here (contract)", "refuse": "stop here (unsafe)",
                 "after-stop": "not reach it (stops earlier)"}[p.action]
        typer.echo(f"{m.id}  [{a.phase}{tx}] -> `migrate safe` would {would}")
        for size in a.sizes.values():
            typer.echo(f"  table {size}")
        for h in a.held:
            span = (f"statements {h.since}-{h.until}, until the commit" if h.until > h.since else
                    f"statement {h.since}" + (", until the commit" if a.transaction else ""))
            typer.echo(f"  holds {h.lock} on {h.table} (blocks {LOCK_BLOCKS.get(h.lock, 'unknown')}) "
                       f"from line {h.line}: {span}")
        for s in a.statements:
            first = " ".join(s.sql.split())[:72]
            rw = ", REWRITES the table" if s.rewrites else ""
            bf = ", batched backfill" if s.backfill else ""
            typer.echo(f"  {s.line}:{s.col} {first}")
            typer.echo(f"      lock {s.lock} (blocks {s.blocks}){rw}{bf}  phase {s.phase}")
            for f in s.findings:
                ign = f"  (ignored: {f.ignored})" if f.ignored else ""
                typer.echo(f"      {f.severity} [{f.rule}] {f.message}{ign}")
                typer.echo(f"        recipe: {f.recipe}")
        for f in a.findings:
            if f.statement == 0:
                typer.echo(f"  {f}\n    recipe: {f.recipe}")


@app.command()
def safe(config: str = CONFIG, release: str | None = RELEASE, release_dir: str | None = RELEASE_DIR,
         database: str | None = DATABASE, allow_out_of_order: bool = OUT_OF_ORDER, wait: bool = WAIT,
         as_json: bool = JSON) -> None:
    """Apply expand migrations; stop before the first contract or unsafe one."""
    from changeover.migrations import commands
    _apply_out(commands.safe(config_mod.load(config), release, _progress, wait=wait, release_dir=release_dir,
                             database_url=database, allow_out_of_order=allow_out_of_order), as_json)


@app.command()
def up(config: str = CONFIG, allow_unsafe: bool = typer.Option(False, "--allow-unsafe"),
       release: str | None = RELEASE, release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE,
       allow_out_of_order: bool = OUT_OF_ORDER, wait: bool = WAIT, as_json: bool = JSON) -> None:
    """Apply everything pending; unsafe migrations need --allow-unsafe."""
    from changeover.migrations import commands
    res = commands.up(config_mod.load(config), release, _progress, allow_unsafe=allow_unsafe, wait=wait,
                      release_dir=release_dir, database_url=database, allow_out_of_order=allow_out_of_order)
    _apply_out(res, as_json)


@app.command()
def contract(config: str = CONFIG, force: bool = typer.Option(
        False, "--force", help="Proceed when the daemon state cannot tell whether an older release is live."),
        release: str | None = RELEASE, release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE,
        allow_out_of_order: bool = OUT_OF_ORDER, wait: bool = WAIT, as_json: bool = JSON) -> None:
    """Apply contract migrations once no older release is live."""
    from changeover.migrations import commands
    cfg = config_mod.load(config)
    res = commands.contract(cfg, release, _progress, older_release_live=older_release_live(cfg), force=force,
                            wait=wait, release_dir=release_dir, database_url=database,
                            allow_out_of_order=allow_out_of_order)
    _apply_out(res, as_json)


@app.command()
def rollback(config: str = CONFIG, steps: int | None = typer.Option(None, "--steps", help="How many (default 1)."),
             to: str | None = typer.Option(None, "--to", help="Roll back everything newer than VERSION, "
                                                               "leaving VERSION applied."),
             everything: bool = typer.Option(False, "--all", help="Roll back every applied migration."),
             allow_data_loss: bool = typer.Option(False, "--allow-data-loss"),
             force: bool = typer.Option(False, "--force", help="Undo migrations the live or standby release "
                                                               "needs."),
             release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE, wait: bool = WAIT,
             as_json: bool = JSON) -> None:
    """Run down scripts, newest first, each in its own transaction; all are checked first."""
    from changeover.migrations import commands
    res = commands.rollback(config_mod.load(config), steps, to, everything=everything,
                            allow_data_loss=allow_data_loss, force=force, progress=_progress, wait=wait,
                            release_dir=release_dir, database_url=database)
    if as_json:
        _emit(res.to_json())
        return
    _steps("rolled back", res.rolled_back)
    if not res.rolled_back:
        typer.echo("nothing to roll back")


@app.command()
def lint(paths: list[str] = typer.Argument(None, help="Files or directories (default: [migrations] dir)."),
         config: str = CONFIG, dialect: str | None = typer.Option(None, "--dialect",
                                                                  help="postgresql or sqlite."),
         database: str | None = typer.Option(
             None, "--database", help="Judge against this database's tables (sizes, row estimates); "
             "`config` for [migrations] database."),
         as_json: bool = JSON) -> None:
    """Lint migrations (down scripts too) with PostgreSQL's own parser; exit 1 on errors."""
    from changeover.migrations import commands
    cfg = config_mod.load(config) if (not paths or Path(config).is_file()) else None
    if dialect not in (None, "postgresql", "sqlite"):
        raise LintFailed(f"--dialect expects postgresql or sqlite, got {dialect!r}")
    res = commands.lint(cfg, paths or None, dialect, use_database=database == "config",
                        database_url=None if database == "config" else database)
    if as_json:
        _emit(res.to_json())
    else:
        for f in res.findings:
            ign = f"  (ignored: {f.ignored})" if f.ignored else ""
            typer.echo(f"{f}{ign}\n    recipe: {f.recipe}")
        typer.echo(f"{res.files} files, {res.statements} statements, {len(res.errors)} errors", err=True)
    if not res.ok:
        raise LintFailed(f"{len(res.errors)} lint error(s)")


@app.command()
def new(name: str, config: str = CONFIG, release_dir: str | None = RELEASE_DIR, as_json: bool = JSON) -> None:
    """Create an empty migration in the directory's layout."""
    from changeover.migrations import commands
    files = commands.new(config_mod.load(config), name, release_dir=release_dir)
    if as_json:
        _emit({"files": [str(f) for f in files]})
    else:
        for f in files:
            typer.echo(f"created {f}")


@app.command()
def repair(config: str = CONFIG, dirty: str | None = typer.Option(
        None, "--dirty", help="Resolve a dirty migration: applied (its changes are all in place) or pending "
                              "(none are)."),
        release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE, as_json: bool = JSON) -> None:
    """Accept changed migration files (record their current checksums); resolve a dirty migration."""
    from changeover.migrations import commands
    fixed = commands.repair(config_mod.load(config), dirty=dirty, release_dir=release_dir, database_url=database)
    if as_json:
        _emit({"repaired": fixed})
    else:
        typer.echo("\n".join(f"repaired {v}" for v in fixed) or "nothing to repair")


@app.command()
def baseline(version: str, config: str = CONFIG, release: str | None = RELEASE,
             release_dir: str | None = RELEASE_DIR, database: str | None = DATABASE, as_json: bool = JSON) -> None:
    """Adopt an existing database: record every migration up to VERSION as applied, without running it."""
    from changeover.migrations import commands
    ids = commands.baseline(config_mod.load(config), version, release=release, release_dir=release_dir,
                            database_url=database)
    if as_json:
        _emit({"baselined": ids})
    else:
        typer.echo("\n".join(f"recorded {v} as applied (not run)" for v in ids))
