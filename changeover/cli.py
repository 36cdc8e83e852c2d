"""The `changeover` command line: parses, calls commands.py, renders. Errors -> message + exit code."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from changeover import commands
from changeover import config as config_mod
from changeover.config import Config
from changeover.errors import ChangeoverError
from changeover.errors import UsageError as ChangeoverUsage
from changeover.fleet import cli as fleet_cli

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Zero-downtime blue-green deploys for any HTTP app.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")
maintenance_app = typer.Typer(no_args_is_help=True, help="Answer every request with 503 and a maintenance page, "
                              "or serve again.")
app.add_typer(maintenance_app, name="maintenance")

# Piped output is read by programs and people with wide windows: never wrap it at 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 400)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 400)

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="Path to changeover.toml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DEFAULT = Path(config_mod.DEFAULT_CONFIG)


def load(path: Path) -> Config:
    return config_mod.load(path)


def daemon_at(path: Path) -> config_mod.Location:
    """For the controls of a running daemon: found from the file's location, not its contents, so
    `status` and `rollback` work while changeover.toml is being edited (or broken)."""
    return config_mod.locate(path)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


class StepPrinter:
    """Shows a deploy's steps live: a spinner on the running step, a line with its duration after."""

    MARK = {"ok": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]"}

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status: Status | None = None

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "plan":
            live = ev.get("live") or "nothing"
            self.console.print(f"deploying [bold]{ev['version']}[/] to {ev['slot']} "
                               f"(live: {live}, deployment #{ev['deployment']})")
        elif kind == "step":
            if ev["state"] == "running":
                self._stop()
                if self.console.is_terminal:
                    self.status = self.console.status(f"{ev['name']}…")
                    self.status.start()
                return
            self._stop()
            detail = f"  [dim]{escape(str(ev['detail']))}[/]" if ev.get("detail") else ""
            self.console.print(f"  {self.MARK.get(ev['state'], '?')} {ev['name']:<34} "
                               f"{ev.get('duration', 0):7.3f}s{detail}")
        elif kind == "live":
            self._stop()
            self.console.print(f"[bold green]{ev['version']} is live[/] on {ev['slot']} "
                               f"(switch {ev['switch_ms']:.1f} ms)")
        elif kind == "output":   # a build's output line, as it is written
            self.console.print(f"      [dim]{escape(str(ev.get('line', '')))}[/]")
        elif kind == "check":
            self._stop()
            mark = "[green]✓[/]" if ev.get("ok") else "[red]✗[/]"
            name, detail = escape(str(ev.get("name"))), escape(str(ev.get("detail") or ""))
            self.console.print(f"      {mark} {name}  [dim]{detail}[/]")

    def _stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


@app.command()
def serve(config: ConfigOpt = DEFAULT) -> None:
    """Run the daemon in the foreground: proxy, supervisor, monitor, control API."""
    commands.serve(load(config))


@app.command()
def deploy(version: Annotated[str, typer.Argument(help="Release name, e.g. v42 or a git sha.")],
           path: Annotated[Path | None, typer.Option("--path", help="Directory the app runs from.")] = None,
           git: Annotated[str | None, typer.Option("--git", help="Export this branch/tag/commit of [releases] "
                                                   "repo into releases/VERSION, then build it.")] = None,
           archive: Annotated[Path | None, typer.Option("--archive", help="Unpack this .tar.gz into "
                                                        "releases/VERSION, then build it.")] = None,
           wait: Annotated[bool, typer.Option("--wait", help="Block through the observation window.")] = False,
           env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for this release.")] = None,
           no_switch: Annotated[bool, typer.Option("--no-switch", help="Prepare only: start and verify the "
                                                   "release privately; `changeover switch` puts it live.")] = False,
           config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Deploy VERSION: start it in the idle slot, verify it, switch traffic, keep the old one warm."""
    cfg = load(config)   # a clear error here; the daemon reads the file again for the deploy
    config_mod.require_app(cfg)
    overrides = commands.parse_env(env or [])
    if cfg.fleet is not None:   # [fleet] hook: the coordinator deploys every host (changeover/fleet/cli.py)
        return fleet_cli.deploy(cfg, version, path, overrides, no_switch, json_out)
    printer = StepPrinter(err)
    try:
        result = commands.deploy(cfg, version, None if path is None else str(path), wait=wait, env=overrides,
                                 no_switch=no_switch, progress=None if json_out else printer, git=git,
                                 archive=None if archive is None else str(archive))
    finally:
        printer._stop()
    if json_out:
        _print_json(result)
    elif result.get("state") == "prepared":
        err.print(f"{version} is prepared on {result.get('slot')} (deployment #{result['deployment']}): "
                  "`changeover switch` puts it live, `changeover abort` drops it")
    elif result.get("observing"):
        err.print(f"{version} is live; deployment #{result['deployment']} goes on with verification and "
                  "observation (`changeover status` follows it, `deploy --wait` blocks until it ends)")
    else:
        err.print(f"[bold green]{version} finalised[/]")


@app.command()
def rollback(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
             schema: Annotated[bool, typer.Option("--schema", help="Also undo the migrations the release "
                                                  "applied (down scripts, after the code switch).")] = False,
             allow_data_loss: Annotated[bool, typer.Option("--allow-data-loss", help="With --schema: allow "
                                                           "down scripts that drop data.")] = False,
             config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Switch back to the previous release, code and config (instantly when its slot is still warm)."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.control(fleet, "rollback", reason, json_out)
    printer = StepPrinter(err)
    try:
        result = commands.rollback(daemon_at(config), reason=reason, schema=schema, allow_data_loss=allow_data_loss,
                                   progress=None if json_out else printer)
    finally:
        printer._stop()
    if json_out:
        _print_json(result)
    else:
        err.print(f"rolled back to [bold]{result.get('version')}[/] on {result.get('slot')} "
                  f"(switch {result.get('switch_ms') or 0:.1f} ms)")


@app.command()
def switch(wait: Annotated[bool, typer.Option("--wait", help="Block through the observation window.")] = False,
           config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Put the prepared release (`deploy --no-switch`) live, verify it through the proxy, observe it."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.switch(config, fleet, json_out)
    printer = StepPrinter(err)
    try:
        result = commands.switch(daemon_at(config), wait=wait, progress=None if json_out else printer)
    finally:
        printer._stop()
    if json_out:
        _print_json(result)
    elif result.get("observing"):
        err.print(f"{result.get('version')} is live; deployment #{result['deployment']} goes on with observation")
    else:
        err.print(f"[bold green]{result.get('version')} finalised[/]")


@app.command()
def promote(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """End the observation window now and finalise (e.g. to deploy a hotfix right after)."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.control(fleet, "promote", None, json_out)
    result = commands.promote(daemon_at(config))
    if json_out:
        _print_json(result)
    else:
        err.print(f"[bold green]{result.get('version')} finalised[/] (promoted)")


@app.command()
def abort(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
          config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Stop the deployment in progress: before the switch nothing changes; after it, traffic goes back."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.control(fleet, "abort", reason, json_out)
    result = commands.abort(daemon_at(config), reason=reason)
    if json_out:
        _print_json(result)
    else:
        live = result.get("live_version") or result.get("version")
        err.print(f"deployment #{result.get('deployment')} {result.get('state')}; live: {live}")


@app.command()
def reload(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Have the running daemon re-read changeover.toml and .env (deploys do so by themselves)."""
    result = commands.reload(daemon_at(config))
    if json_out:
        _print_json(result)
    else:
        err.print(f"re-read {result['file']}")


@app.command("stop-standby")
def stop_standby(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Drain and stop the warm standby (rollback will then start the previous release first)."""
    result = commands.stop_standby(daemon_at(config))
    if json_out:
        _print_json(result)
    elif result["stopped"]:
        err.print(f"stopped {result['stopped']['version']} in {result['stopped']['slot']}")
        if result["stopped"].get("tunnels"):   # its tunnels are not waited for (docs/operations.md)
            err.print(f"  {escape(str(result['stopped']['tunnels']))}")
    else:
        err.print("no standby running")


@app.command("reload-proxy")
def reload_proxy(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Replace the proxy worker without dropping a request (after upgrading changeover)."""
    result = commands.reload_proxy(daemon_at(config))
    if json_out:
        _print_json(result)
    else:
        err.print(f"proxy handed over from pid {result['old_pid']} to pid {result['pid']}")


@app.command()
def down(config: ConfigOpt = DEFAULT) -> None:
    """Stop everything: drain and stop the app's slots, then the proxy and the daemon."""
    result = commands.down(daemon_at(config))
    err.print(f"stopped {', '.join(result.get('stopped') or []) or 'nothing running'}; the proxy and the daemon "
              "are stopping")


def _duration(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    from changeover.tables import parse_duration

    try:
        return parse_duration(value.strip())
    except ValueError:
        raise ChangeoverUsage(f"{option} {value!r}: expected seconds, or a duration like '30s' or '2m'") from None


@app.command()
def pause(timeout: Annotated[str | None, typer.Option("--timeout", help="Seconds (or '30s', '2m') before the "
                                                       "proxy resumes by itself ([proxy] pause_timeout).")] = None,
          reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
          config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Hold new requests briefly (e.g. a database failover): none is forwarded or failed; `resume`
    sends them on in order. Requests in flight finish."""
    result = commands.pause(daemon_at(config), timeout=_duration(timeout, "--timeout"), reason=reason)
    if json_out:
        _print_json(result)
        return
    p = result.get("pause") or {}
    err.print(f"[yellow]paused[/]: new requests are held until `changeover resume`, at most "
              f"{p.get('timeout') or 0:g}s (until {_ts(p.get('until'))}), then the proxy resumes by itself")
    if result.get("maintenance"):
        err.print("maintenance is on: released requests get the maintenance page")


@app.command()
def resume(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
           config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """End a pause: the held requests go to the live release in the order they arrived."""
    result = commands.resume(daemon_at(config), reason=reason)
    if json_out:
        _print_json(result)
    elif result.get("was_paused") or result.get("released"):
        err.print(f"[green]resumed[/]: {result.get('released', 0)} held request(s) sent on in order")
    else:
        err.print("not paused; nothing to resume")


@maintenance_app.command("on")
def maintenance_on(page: Annotated[Path | None, typer.Option("--page", help="HTML file served with the 503 ([proxy] "
                                                             "maintenance_page, else a built-in page).")] = None,
                   retry_after: Annotated[int | None, typer.Option("--retry-after", help="Seconds in the Retry-After "
                                                                   "header ([proxy] retry_after).")] = None,
                   reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
                   config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Answer every request with 503, the page and Retry-After; requests in flight finish. Deploys
    still run (verified on their slot directly); users see the page until `maintenance off`."""
    result = commands.maintenance(daemon_at(config), True, page=None if page is None else str(page),
                                  retry_after=retry_after, reason=reason)
    if json_out:
        _print_json(result)
        return
    m = result.get("maintenance") or {}
    err.print(f"[yellow]maintenance on[/]: every request gets 503 (page: {escape(str(m.get('page')))}"
              f", Retry-After: {m.get('retry_after')}); `changeover maintenance off` serves again")


@maintenance_app.command("off")
def maintenance_off(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
                    config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Serve the live release again."""
    result = commands.maintenance(daemon_at(config), False, reason=reason)
    if json_out:
        _print_json(result)
    elif result.get("was_on"):
        err.print("[green]maintenance off[/]: serving the live release again")
    else:
        err.print("maintenance was not on; serving")


def _fmt_metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    if not m.get("requests"):
        return "no requests"

    def ms(key: str) -> str:
        v = m.get(key)
        return "-" if v is None else f"{1000 * v:.1f} ms"

    return (f"{m.get('rps') or 0:.1f} req/s  errors {100 * (m.get('error_rate') or 0):.2f}%  "
            f"p50 {ms('p50')}  p95 {ms('p95')}  p99 {ms('p99')}")


def render_status(st: dict[str, Any]) -> Table:
    t = Table(show_header=True, header_style="bold", box=None)
    for col in ("", "slot", "version", "state", "instances", "traffic (last 10 s)"):
        t.add_column(col)
    metrics = st.get("metrics") or {}
    for role in ("live", "standby"):
        s = st.get(role)
        if not s:
            t.add_row(role, "-", "-", "-", "-", "")
            continue
        inst = ", ".join(f"{i['pid']}@{i['port']}" for i in s.get("instances", [])) or "none"
        t.add_row(role, s["slot"], s.get("version") or "-", s.get("state", "serving"), inst,
                  _fmt_metrics(metrics.get(s["slot"])))
    return t


@app.command()
def status(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """What is live, what is on standby, whether a deploy runs, and live traffic numbers."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.status(config, fleet, json_out)
    st = commands.status(daemon_at(config))
    if json_out:
        _print_json(st)
        return
    out.print(render_status(st))
    for line in _mode_lines(st):
        out.print(line)
    for k in st.get("tunnels_kept") or []:   # a retired release still serving its tunnels (docs/operations.md)
        until = time.strftime("%H:%M:%S", time.localtime(float(k.get("until") or 0)))
        out.print(f"tunnels: {k.get('tunnels')} on {escape(str(k.get('version')))} (retired from {k.get('slot')}), "
                  f"closed with 1001 at the drain limit; its processes stop at {until}")
    if (px := st.get("proxy") or {}).get("hosts"):     # host routing (docs/hosting-several-apps.md)
        out.print(f"hosts: {escape(', '.join(px['hosts']))}"
                  + (f" (shared front on {px['listen']}, pid {px.get('pid')})" if px.get("shared") else ""))
    if tls := (st.get("proxy") or {}).get("tls"):     # [proxy.tls] (docs/tls.md)
        acme = [f"{h} until {str(v['expires'])[:10]}" if v.get("expires")
                else f"{h}: {v.get('error') or 'being issued'}" for h, v in (tls.get("acme") or {}).items()]
        out.print(f"https: {tls['listen']}" + (f"; ACME: {escape('; '.join(acme))}" if acme else ""))
    if st.get("deployment"):
        d = st["deployment"]
        out.print(f"{d['kind']} of {d['version']} (#{d['id']}) {d['phase']}")
    obs = (st.get("metrics") or {}).get("observing")
    if obs:
        out.print(f"observing {obs['slot']}: {obs['elapsed']:.0f}s done, {obs['remaining']:.0f}s left; "
                  f"{obs.get('requests', 0)} requests, errors {100 * (obs.get('error_rate') or 0):.2f}% "
                  "in the window")
        from changeover.monitor.render import judgement_lines

        for line in judgement_lines(obs):     # what the latency judgement compares, and against what
            out.print(f"  {escape(line)}")
    for ev in st.get("incidents", []):
        when = datetime.fromtimestamp(ev["ts"]).strftime("%H:%M:%S")
        out.print(f"[yellow]{when} {ev['kind']} {ev.get('slot') or ''}[/] {escape(str(ev.get('detail', '')))}")


def _mode_lines(st: dict[str, Any]) -> list[str]:
    lines = []
    if (m := st.get("maintenance")):
        lines.append(f"[yellow]maintenance on[/] since {_ts(m.get('since'))}: every request gets 503 "
                     f"(page: {escape(str(m.get('page')))}, Retry-After: {m.get('retry_after')})"
                     + (f" — {escape(str(m['why']))}" if m.get("why") else ""))
    if (p := st.get("pause")):
        held = p.get("held")
        lines.append(f"[yellow]paused[/] since {_ts(p.get('since'))}: new requests are held"
                     + (f" ({held} now)" if held is not None else "")
                     + f", resumes by itself at {_ts(p.get('until'))} (in {p.get('remaining') or 0:.0f}s)"
                     + (f" — {escape(str(p['why']))}" if p.get("why") else ""))
    return lines


@app.command()
def top(config: ConfigOpt = DEFAULT,
        interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0) -> None:
    """Live req/s, error rate and latency per slot, refreshed every second (Ctrl-C to quit)."""
    from rich.live import Live

    where = daemon_at(config)
    if not out.is_terminal:
        # Piped: a live display shows nothing; print a timestamped table every interval instead.
        while True:
            out.print(datetime.now().strftime("%H:%M:%S"))
            out.print(render_status(commands.status(where)))
            sys.stdout.flush()
            time.sleep(interval)
    with Live(render_status(commands.status(where)), console=out, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(render_status(commands.status(where)))


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


@app.command()
def history(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False,
            checks: Annotated[bool, typer.Option("--checks", help="Show check results.")] = False,
            steps: Annotated[bool, typer.Option("--steps", help="Show each step with its duration.")] = False,
            limit: Annotated[int, typer.Option("-n", "--limit")] = 20) -> None:
    """Past deployments and rollbacks, newest first."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.history(config, fleet, limit, json_out)
    rows = commands.history(daemon_at(config), limit, traffic=True)
    if json_out:
        _print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("#", "when", "kind", "version", "from", "slot", "state", "took", "reason"):
        t.add_column(col)
    for d in rows:
        took = f"{d['finished_at'] - d['started_at']:.1f}s" if d.get("finished_at") else "-"
        if d["id"] is None:   # pause / resume / maintenance (daemon/traffic.py)
            who = f" ({d['actor']})" if d.get("actor") else ""
            t.add_row("-", _ts(d["started_at"]), d["kind"], "-", "-", "-", d["state"], "-",
                      escape(f"{d.get('reason') or ''}{who}".strip()))
            continue
        t.add_row(str(d["id"]), _ts(d["started_at"]), d["kind"], d["version"], d.get("from") or "-",
                  d.get("slot") or "-", d["state"], took, d.get("reason") or "")
    out.print(t)
    for d in rows if (checks or steps) else []:
        if d["id"] is None:
            continue
        out.print(f"[bold]#{d['id']} {d['kind']} {d['version']}[/]")
        if steps:
            for s in d["steps"]:
                dur = f"{s['duration']:.3f}s" if s.get("duration") is not None else "-"
                out.print(f"   {s['state']:<8} {s['name']:<34} {dur:>9}  {s.get('detail') or ''}")
        if checks:
            for c in d["checks"]:
                mark = "ok " if c.get("ok") else "FAIL"
                dur = f"{c['duration']:.3f}s" if c.get("duration") is not None else ""
                detail = c.get("detail") or ""
                out.print(f"   {mark} {c.get('kind', ''):<10} {c.get('name', ''):<30} {dur:>8}  {detail}")


@app.command()
def logs(config: ConfigOpt = DEFAULT,
         slot: Annotated[str | None, typer.Option("--slot", help="blue or green (default: both)")] = None,
         follow: Annotated[bool, typer.Option("-f", "--follow")] = False,
         lines: Annotated[int, typer.Option("-n", "--lines")] = 50) -> None:
    """The app's output, per slot and release."""
    cfg = daemon_at(config)
    multi = len(commands.log_files(cfg, slot)) > 1
    for path, line in commands.logs(cfg, slot, lines):
        sys.stdout.write(f"{path.parent.name}/{path.name}: {line}\n" if multi else f"{line}\n")
    if follow:
        from changeover.daemon.logs import follow as follow_files

        async def run() -> None:
            async for path, line in follow_files(commands.log_files(cfg, slot), 0):
                sys.stdout.write(f"{path.parent.name}/{path.name}: {line}\n" if multi else f"{line}\n")
                sys.stdout.flush()

        asyncio.run(run())


@config_app.command("check")
def config_check(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Validate changeover.toml and print it resolved, with secrets masked."""
    cfg = load(config)
    resolved = commands.config_check(cfg)
    if json_out:
        _print_json(resolved)
        return
    err.print(f"[green]{config}: ok[/]")
    out.print_json(data=resolved)


@app.command()
def dashboard(config: ConfigOpt = DEFAULT) -> None:
    """Print the login URL of the web dashboard the daemon serves (the token in it is a password)."""
    from changeover.dashboard.auth import login_url

    sys.stdout.write(login_url(daemon_at(config).state_dir) + "\n")


@app.command()
def init(example: Annotated[str | None, typer.Option("--example", help="Copy an example project instead "
                                                     "(node: the Express shop).")] = None,
         json_out: JsonOpt = False) -> None:
    """Write changeover.toml, migrations/ and .env.example for the project here (never overwrites)."""
    from changeover import init as scaffold

    here = Path.cwd()
    res = scaffold.copy_example(example, here) if example else scaffold.init(here)
    if json_out:
        _print_json(res.__dict__)
        return
    err.print(f"{res.project}: wrote {', '.join(res.written) or 'nothing'}"
              + (f"; kept existing {', '.join(res.kept)}" if res.kept else ""))
    for note in res.notes:
        err.print(f"  [dim]{escape(note)}[/]")
    err.print("next:")
    for cmd in res.next:
        out.print(f"  {escape(cmd)}")


@app.command()
def drill(max_reaction: Annotated[float | None, typer.Option("--max-reaction", help="Seconds a trigger may take "
                                                               "to fire before it counts as too slow (30).")] = None,
          config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Rehearse every rollback path on a copy of the live release, unseen by users; exit 1 if one is broken."""
    printer = StepPrinter(err)
    try:
        result = commands.drill(daemon_at(config), max_reaction=max_reaction, progress=None if json_out else printer)
    finally:
        printer._stop()
    if json_out:
        _print_json(result)
    else:
        table = Table("path", "", "figure", "detail", title=f"rollback drill of {result.get('version')} "
                      f"(deployment #{result.get('deployment')})")
        for p in result.get("report", []):
            mark = {True: "[green]✓[/]", False: "[red]✗[/]"}.get(p.get("ok"), "[dim]-[/]")
            table.add_row(p["name"], mark, escape(p.get("figure") or ""), escape(p.get("detail") or ""))
        out.print(table)
    if not result.get("ok"):
        raise typer.Exit(1)


def _mount() -> None:
    """`migrate` and `check` live with their packages (a broken import there must fail loudly, not
    make the command vanish)."""
    from changeover.checks.cli import app as check_app
    from changeover.migrations.cli import app as migrate_app

    app.add_typer(migrate_app, name="migrate", help="Safe, reversible database migrations.")
    app.add_typer(check_app, name="check", help="Run health checks: pre, smoke, flows.")
    from changeover.proxy.front_cli import app as front_app

    app.add_typer(front_app, name="front", help="The shared front several projects share a port through.")


_mount()


def main() -> None:
    try:
        app()  # standalone: click handles usage errors (exit 2) and Ctrl-C itself
    except ChangeoverError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(e.exit_code)
