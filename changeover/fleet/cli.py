"""The command line of a fleet: what `changeover deploy/switch/promote/abort/rollback/status/history`
do when the config has `[fleet]` (cli.py calls these through one marked line per command).

Each host's steps are streamed back through etcd and printed with the host's name in front.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeover import commands
from changeover.config import Config, locate, release_env
from changeover.errors import DaemonError, UsageError
from changeover.fleet.config import FleetConfig, peek

if TYPE_CHECKING:
    from changeover.fleet.coordinator import Coordinator

err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 400)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 400)
MARK = {"ok": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]"}


def run(fleet: FleetConfig, progress: Callable[[dict[str, Any]], None] | None,
        work: Callable[[Coordinator], Any]) -> Any:
    """The coordinator's run, imported when a fleet command runs: its etcd client (httpx) would
    otherwise cost every CLI call of every project ~0.1 s."""
    from changeover.fleet.coordinator import run as coordinate

    return coordinate(fleet, progress, work)


def configured(path: Path) -> FleetConfig | None:
    """[fleet] of the file (read alone: the controls work while the rest of the file is edited)."""
    return peek(path)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def printer(ev: dict[str, Any]) -> None:
    """One line per finished step of every host, and the coordinator's own lines."""
    if ev.get("type") == "fleet":
        color = "bold" if ev.get("ok") else "yellow"
        err.print(f"[{color}]fleet[/] {escape(str(ev.get('message')))}")
        return
    host, e = str(ev.get("host")), ev.get("event") or {}
    kind = e.get("type")
    if kind == "step" and e.get("state") != "running":
        detail = f"  [dim]{escape(str(e['detail']))}[/]" if e.get("detail") else ""
        err.print(f"{host:<12} {MARK.get(e.get('state', ''), '?')} {escape(str(e.get('name'))):<34} "
                  f"{e.get('duration') or 0:7.3f}s{detail}")
    elif kind == "live":
        err.print(f"{host:<12} [green]{e.get('version')} is live[/] on {e.get('slot')} "
                  f"(switch {e.get('switch_ms') or 0:.1f} ms)")
    elif kind == "check" and not e.get("ok"):
        err.print(f"{host:<12}     [red]✗[/] {escape(str(e.get('name')))}  [dim]{escape(str(e.get('detail')))}[/]")


def _migrate_once(cfg: Config, version: str, path: str, env: dict[str, str]) -> Callable[[], str] | None:
    """Expand migrations for the whole fleet, run here once (each host's step then has nothing to do)."""
    from changeover.migrations import commands as migrate

    url = release_env(cfg, version, env).get(cfg.checks.pre.database_var) or cfg.migrations.database
    if not migrate.enabled(cfg, path, url):
        return None

    def go() -> str:
        r = migrate.safe(cfg, release=version, release_dir=path, database_url=url, refuse_unsafe=True)
        return f"{len(r.applied)} applied" + (f"; contract pending: {', '.join(r.contract_pending)}"
                                               if r.contract_pending else "")

    return go


def deploy(cfg: Config, version: str, path: Path | None, env: dict[str, str], no_switch: bool,
           json_out: bool) -> None:
    assert cfg.fleet is not None
    if path is None:
        raise UsageError("--path DIR: a fleet deploy names the release directory (present on every host)")
    if not version or any(c.isspace() for c in version):
        raise UsageError(f"version {version!r}: expected a non-empty name without spaces")
    # The release directory must exist on every host (each host's prepare says so if not). A
    # relative path is relative to each host's config directory, as it is for one host.
    app_dir = Path(path).expanduser()
    here = app_dir if app_dir.is_absolute() else cfg.root / app_dir
    migrate = _migrate_once(cfg, version, str(here), env) if here.is_dir() else None
    result = run(cfg.fleet, None if json_out else printer, lambda c: c.deploy(
        version, str(app_dir), env, no_switch=no_switch, migrate=migrate, monitor=cfg.monitor))
    _done(result, json_out)


def _done(result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        _print_json(result)
        return
    hosts = ", ".join(f"{h}: {r.get('live')}" for h, r in (result.get("hosts") or {}).items())
    if result.get("state") == "prepared":
        err.print(f"{result['version']} is prepared on every host (fleet deployment {result['id']}): "
                  "`changeover switch` puts it live, `changeover abort` drops it")
    elif result.get("state") == "succeeded":
        err.print(f"[bold green]{result['version']} finalised fleet-wide[/] (switch skew "
                  f"{result.get('skew_ms') or 0:.1f} ms; {hosts})")
    else:
        err.print(f"fleet deployment {result.get('id')}: {result.get('state')}; {hosts}")


def switch(path: Path, fleet: FleetConfig, json_out: bool) -> None:
    from changeover import config as config_mod

    monitor = config_mod.load(path).monitor
    _done(run(fleet, None if json_out else printer, lambda c: c.switch(monitor)), json_out)


def control(fleet: FleetConfig, verb: str, reason: str | None, json_out: bool) -> None:
    result = run(fleet, None if json_out else printer, lambda c: c.control(verb, reason))
    if json_out:
        _print_json(result)
        return
    hosts = ", ".join(f"{h}: {r.get('live')}" for h, r in (result.get("hosts") or {}).items())
    err.print(f"fleet {verb}: {result.get('version')} is the fleet's release ({hosts})")


def status(path: Path, fleet: FleetConfig, json_out: bool) -> None:
    """This host's own status (when a daemon runs here) with every host of the fleet."""
    try:
        st: dict[str, Any] = commands.status(locate(path))
    except DaemonError:
        st = {"local": None}   # an operator machine: no daemon here
    async def read(c: Coordinator) -> dict[str, Any]:
        return await c.status()

    st.update(run(fleet, None, read))
    if json_out:
        _print_json(st)
        return
    if st.get("live") is not None or "local" not in st:
        from changeover.cli.views import render_status

        out.print(render_status(st))
    f = st["fleet"]
    d = f.get("desired")
    if d:
        out.print(f"fleet {f['prefix']}: deployment {d['id']} of {d['version']} ({d['action']}"
                  f"{', held for switch' if d.get('held') else ''}); the fleet's release: {f.get('live') or '-'}")
    if f.get("note"):
        out.print(f"  {escape(str(f['note']))}")
    if f.get("lock"):
        lk = f["lock"]
        out.print(f"locked by {lk.get('holder')} (pid {lk.get('pid')} on {lk.get('host')}): {lk.get('what')}")
    t = Table(box=None, header_style="bold")
    for col in ("host", "live", "standby", "in sync", "deployment", "heartbeat"):
        t.add_column(col)
    for name, h in st["hosts"].items():
        live = h.get("live") or {}
        sb = h.get("standby") or {}
        dep = h.get("deployment") or {}
        sync = "[green]yes[/]" if h.get("in_sync") else f"[red]no[/] {escape(str(h.get('why') or ''))}"
        t.add_row(name, f"{live.get('version') or '-'} ({live.get('slot') or '-'})",
                  f"{sb.get('version') or '-'}" + (" warm" if sb.get("warm") else ""), sync,
                  f"{dep.get('version')} {dep.get('phase')}" if dep else "-",
                  f"{h['heartbeat_age']:.1f}s ago" if "heartbeat_age" in h else "none")
    out.print(t)


def history(path: Path, fleet: FleetConfig, limit: int, json_out: bool) -> None:
    async def read(c: Coordinator) -> list[dict[str, Any]]:
        return await c.history(limit)

    rows = run(fleet, None, read)
    if json_out:
        _print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("fleet deployment", "when", "version", "from", "state", "skew", "hosts", "reason"):
        t.add_column(col)
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r.get("started_at") or 0)))
        hosts = ", ".join(f"{h}: {'/'.join(str(v.get('state')) for v in res.values()) or '-'}"
                          for h, res in (r.get("hosts") or {}).items())
        skew = f"{r['skew_ms']:.1f} ms" if r.get("skew_ms") is not None else "-"
        t.add_row(str(r.get("id")), when, str(r.get("version")), str(r.get("from") or "-"), str(r.get("state")),
                  skew, hosts, escape(str(r.get("reason") or "")))
    out.print(t)
