"""The deploy verbs: deploy, switch, promote, abort, rollback, stop-standby and the rollback drill,
with the live display of a deployment's steps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from changeover import commands
from changeover import config as config_mod
from changeover.cli.common import DEFAULT, ConfigOpt, JsonOpt, daemon_at, err, load, out, print_json
from changeover.fleet import cli as fleet_cli


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
        print_json(result)
    elif result.get("state") == "prepared":
        err.print(f"{version} is prepared on {result.get('slot')} (deployment #{result['deployment']}): "
                  "`changeover switch` puts it live, `changeover abort` drops it")
    elif result.get("observing"):
        err.print(f"{version} is live; deployment #{result['deployment']} goes on with verification and "
                  "observation (`changeover status` follows it, `deploy --wait` blocks until it ends)")
    else:
        err.print(f"[bold green]{version} finalised[/]")


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
        print_json(result)
    else:
        err.print(f"rolled back to [bold]{result.get('version')}[/] on {result.get('slot')} "
                  f"(switch {result.get('switch_ms') or 0:.1f} ms)")


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
        print_json(result)
    elif result.get("observing"):
        err.print(f"{result.get('version')} is live; deployment #{result['deployment']} goes on with observation")
    else:
        err.print(f"[bold green]{result.get('version')} finalised[/]")


def promote(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """End the observation window now and finalise (e.g. to deploy a hotfix right after)."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.control(fleet, "promote", None, json_out)
    result = commands.promote(daemon_at(config))
    if json_out:
        print_json(result)
    else:
        err.print(f"[bold green]{result.get('version')} finalised[/] (promoted)")


def abort(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
          config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Stop the deployment in progress: before the switch nothing changes; after it, traffic goes back."""
    if (fleet := fleet_cli.configured(config)) is not None:   # [fleet] hook: every host (changeover/fleet)
        return fleet_cli.control(fleet, "abort", reason, json_out)
    result = commands.abort(daemon_at(config), reason=reason)
    if json_out:
        print_json(result)
    else:
        live = result.get("live_version") or result.get("version")
        err.print(f"deployment #{result.get('deployment')} {result.get('state')}; live: {live}")


def stop_standby(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Drain and stop the warm standby (rollback will then start the previous release first)."""
    result = commands.stop_standby(daemon_at(config))
    if json_out:
        print_json(result)
    elif result["stopped"]:
        err.print(f"stopped {result['stopped']['version']} in {result['stopped']['slot']}")
        if result["stopped"].get("tunnels"):   # its tunnels are not waited for (docs/operations.md)
            err.print(f"  {escape(str(result['stopped']['tunnels']))}")
    else:
        err.print("no standby running")


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
        print_json(result)
    else:
        table = Table("path", "", "figure", "detail", title=f"rollback drill of {result.get('version')} "
                      f"(deployment #{result.get('deployment')})")
        for p in result.get("report", []):
            mark = {True: "[green]✓[/]", False: "[red]✗[/]"}.get(p.get("ok"), "[dim]-[/]")
            table.add_row(p["name"], mark, escape(p.get("figure") or ""), escape(p.get("detail") or ""))
        out.print(table)
    if not result.get("ok"):
        raise typer.Exit(1)
