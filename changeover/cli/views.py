"""The verbs that look: status, top, history and logs, and the status table the fleet view reuses."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from changeover import commands
from changeover.cli.common import DEFAULT, ConfigOpt, JsonOpt, daemon_at, out, print_json, ts
from changeover.fleet import cli as fleet_cli


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


def status(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """What is live, what is on standby, whether a deploy runs, and live traffic numbers."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.status(config, fleet, json_out)
    st = commands.status(daemon_at(config))
    if json_out:
        print_json(st)
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
        lines.append(f"[yellow]maintenance on[/] since {ts(m.get('since'))}: every request gets 503 "
                     f"(page: {escape(str(m.get('page')))}, Retry-After: {m.get('retry_after')})"
                     + (f" — {escape(str(m['why']))}" if m.get("why") else ""))
    if (p := st.get("pause")):
        held = p.get("held")
        lines.append(f"[yellow]paused[/] since {ts(p.get('since'))}: new requests are held"
                     + (f" ({held} now)" if held is not None else "")
                     + f", resumes by itself at {ts(p.get('until'))} (in {p.get('remaining') or 0:.0f}s)"
                     + (f" — {escape(str(p['why']))}" if p.get("why") else ""))
    return lines


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


def history(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False,
            checks: Annotated[bool, typer.Option("--checks", help="Show check results.")] = False,
            steps: Annotated[bool, typer.Option("--steps", help="Show each step with its duration.")] = False,
            limit: Annotated[int, typer.Option("-n", "--limit")] = 20) -> None:
    """Past deployments and rollbacks, newest first."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.history(config, fleet, limit, json_out)
    rows = commands.history(daemon_at(config), limit, traffic=True)
    if json_out:
        print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("#", "when", "kind", "version", "from", "slot", "state", "took", "reason"):
        t.add_column(col)
    for d in rows:
        took = f"{d['finished_at'] - d['started_at']:.1f}s" if d.get("finished_at") else "-"
        if d["id"] is None:   # pause / resume / maintenance (daemon/traffic.py)
            who = f" ({d['actor']})" if d.get("actor") else ""
            t.add_row("-", ts(d["started_at"]), d["kind"], "-", "-", "-", d["state"], "-",
                      escape(f"{d.get('reason') or ''}{who}".strip()))
            continue
        t.add_row(str(d["id"]), ts(d["started_at"]), d["kind"], d["version"], d.get("from") or "-",
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
