"""The `changeover` command line: parses, calls commands.py, renders. Errors -> message + exit code.

The verbs live by what they do (deploys, controls, views, project); this module is the table that
mounts them, in the order `changeover --help` lists them."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from changeover.cli import controls, deploys, project, views
from changeover.cli.common import err
from changeover.errors import ChangeoverError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Zero-downtime blue-green deploys for any HTTP app.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(config_app, name="config")
maintenance_app = typer.Typer(no_args_is_help=True, help="Answer every request with 503 and a maintenance page, "
                              "or serve again.")
app.add_typer(maintenance_app, name="maintenance")

app.command()(project.serve)
app.command()(deploys.deploy)
app.command()(deploys.rollback)
app.command()(deploys.switch)
app.command()(deploys.promote)
app.command()(deploys.abort)
app.command()(controls.reload)
app.command("stop-standby")(deploys.stop_standby)
app.command("reload-proxy")(controls.reload_proxy)
app.command()(controls.down)
app.command()(controls.pause)
app.command()(controls.resume)
maintenance_app.command("on")(controls.maintenance_on)
maintenance_app.command("off")(controls.maintenance_off)
app.command()(views.status)
app.command()(views.top)
app.command()(views.history)
app.command()(views.logs)
config_app.command("check")(project.config_check)
app.command()(project.dashboard)
app.command()(project.init)
app.command()(deploys.drill)


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
