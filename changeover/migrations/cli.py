"""`changeover migrate ...`: a thin typer layer over commands.py.

Commands raise ChangeoverError subclasses; the main CLI turns them into `error: ...` and an exit
code. `--json` prints one JSON document on stdout; progress goes to stderr either way.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import typer

from changeover import config as config_mod
from changeover.errors import LintFailed
from changeover.migrations import commands
from changeover.migrations.engine import StepResult
from changeover.migrations.results import ApplyResult

app = typer.Typer(help="Safe, reversible database migrations (expand/contract).", no_args_is_help=True)

CONFIG = typer.Option(config_mod.DEFAULT_CONFIG, "-c", "--config", help="Path to changeover.toml.")
JSON = typer.Option(False, "--json", help="Print one JSON document.")
RELEASE = typer.Option(None, "--release", help="Release being deployed (recorded in the history).")
WAIT = typer.Option(False, "--wait", help="Wait for another migration run to finish instead of failing.")


def _progress(msg: str) -> None:
    typer.echo(msg, err=True)


def _emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def older_release_live(config: config_mod.Config) -> bool | None:
    """From the daemon's state (.changeover/state.db beside the config): is an older release still
    running? None when it cannot be told (no state file, no slots table yet, no live slot)."""
    path = config.state_dir / "state.db"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            rows = db.execute("SELECT name, state, release_id, instances FROM slots").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    live = [r for r in rows if r[1] == "live"]
    if len(live) != 1:
        return None
    running = ("live", "standby", "starting", "stopping")
    return any(r[1] in running and r[2] is not None and r[2] != live[0][2] and (r[3] or "[]") != "[]"
               for r in rows if r is not live[0])


def _steps(title: str, steps: list[StepResult]) -> None:
    for s in steps:
        extra = f", backfilled {s.backfilled_rows} rows" if s.backfilled_rows else ""
        retry = f", {s.attempts} attempts" if s.attempts > 1 else ""
        typer.echo(f"{title} {s.version}_{s.name} ({s.phase}, {s.duration_ms} ms{retry}{extra})")


def _apply_out(res: ApplyResult, as_json: bool) -> None:
    if as_json:
        _emit(res.to_json())
        return
    _steps("applied", res.applied)
    if not res.applied:
        typer.echo("nothing to apply" if not res.stopped_at else "nothing applied")
    if res.stopped_at:
        typer.echo(res.stopped_at.reason)


@app.command()
def status(config: str = CONFIG, as_json: bool = JSON) -> None:
    """Applied and pending migrations, drift, interrupted backfills."""
    res = commands.status(config_mod.load(config))
    if as_json:
        _emit(res.to_json())
        return
    typer.echo(f"database: {res.database}")
    for m in res.migrations:
        flag = "  CHANGED since applied (see `migrate repair`)" if m.drifted else ""
        rel = f"  release {m.release}" if m.release else ""
        typer.echo(f"{m.state:<12} {m.version}_{m.name}  [{m.phase}]{rel}{flag}")
    typer.echo(f"{len(res.pending)} pending")


@app.command()
def plan(config: str = CONFIG, as_json: bool = JSON) -> None:
    """Dry run: each pending statement with its lock, rewrite, phase and lint findings."""
    res = commands.plan(config_mod.load(config))
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
def safe(config: str = CONFIG, release: str | None = RELEASE, wait: bool = WAIT, as_json: bool = JSON) -> None:
    """Apply expand migrations; stop before the first contract or unsafe one."""
    _apply_out(commands.safe(config_mod.load(config), release, _progress, wait=wait), as_json)


@app.command()
def up(config: str = CONFIG, allow_unsafe: bool = typer.Option(False, "--allow-unsafe"),
       release: str | None = RELEASE, wait: bool = WAIT, as_json: bool = JSON) -> None:
    """Apply everything pending; unsafe migrations need --allow-unsafe."""
    res = commands.up(config_mod.load(config), release, _progress, allow_unsafe=allow_unsafe, wait=wait)
    _apply_out(res, as_json)


@app.command()
def contract(config: str = CONFIG, force: bool = typer.Option(
        False, "--force", help="Proceed when the daemon state cannot tell whether an older release is live."),
        release: str | None = RELEASE, wait: bool = WAIT, as_json: bool = JSON) -> None:
    """Apply contract migrations once no older release is live."""
    cfg = config_mod.load(config)
    res = commands.contract(cfg, release, _progress, older_release_live=older_release_live(cfg), force=force,
                            wait=wait)
    _apply_out(res, as_json)


@app.command()
def rollback(config: str = CONFIG, steps: int | None = typer.Option(None, "--steps", help="How many (default 1)."),
             to: str | None = typer.Option(None, "--to", help="Roll back everything newer than VERSION."),
             allow_data_loss: bool = typer.Option(False, "--allow-data-loss"), wait: bool = WAIT,
             as_json: bool = JSON) -> None:
    """Run down scripts, newest first, each in its own transaction."""
    res = commands.rollback(config_mod.load(config), steps, to, allow_data_loss=allow_data_loss,
                            progress=_progress, wait=wait)
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
         as_json: bool = JSON) -> None:
    """Lint migrations with PostgreSQL's own parser; exit 1 on errors."""
    cfg = config_mod.load(config) if (not paths or Path(config).is_file()) else None
    if dialect not in (None, "postgresql", "sqlite"):
        raise LintFailed(f"--dialect expects postgresql or sqlite, got {dialect!r}")
    res = commands.lint(cfg, paths or None, dialect)
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
def new(name: str, config: str = CONFIG, as_json: bool = JSON) -> None:
    """Create an empty migration in the directory's layout."""
    files = commands.new(config_mod.load(config), name)
    if as_json:
        _emit({"files": [str(f) for f in files]})
    else:
        for f in files:
            typer.echo(f"created {f}")


@app.command()
def repair(config: str = CONFIG, as_json: bool = JSON) -> None:
    """Accept changed migration files: record their current checksums."""
    fixed = commands.repair(config_mod.load(config))
    if as_json:
        _emit({"repaired": fixed})
    else:
        typer.echo("\n".join(f"repaired {v}" for v in fixed) or "nothing to repair")
