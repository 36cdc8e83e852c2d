"""The project's own verbs: write its files (init), check its config, run its daemon (serve) and
print the dashboard's login URL."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from changeover import commands
from changeover.cli.common import DEFAULT, ConfigOpt, JsonOpt, daemon_at, err, load, out, print_json


def serve(config: ConfigOpt = DEFAULT) -> None:
    """Run the daemon in the foreground: proxy, supervisor, monitor, control API."""
    commands.serve(load(config))


def config_check(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Validate changeover.toml and print it resolved, with secrets masked."""
    cfg = load(config)
    resolved = commands.config_check(cfg)
    if json_out:
        print_json(resolved)
        return
    err.print(f"[green]{config}: ok[/]")
    out.print_json(data=resolved)


def dashboard(config: ConfigOpt = DEFAULT) -> None:
    """Print the login URL of the web dashboard the daemon serves (the token in it is a password)."""
    from changeover.dashboard.auth import login_url

    sys.stdout.write(login_url(daemon_at(config).state_dir) + "\n")


def init(example: Annotated[str | None, typer.Option("--example", help="Copy an example project instead "
                                                     "(node: the Express shop).")] = None,
         json_out: JsonOpt = False) -> None:
    """Write changeover.toml, migrations/ and .env.example for the project here (never overwrites)."""
    from changeover import init as scaffold

    here = Path.cwd()
    res = scaffold.copy_example(example, here) if example else scaffold.init(here)
    if json_out:
        print_json(res.__dict__)
        return
    err.print(f"{res.project}: wrote {', '.join(res.written) or 'nothing'}"
              + (f"; kept existing {', '.join(res.kept)}" if res.kept else ""))
    for note in res.notes:
        err.print(f"  [dim]{escape(note)}[/]")
    err.print("next:")
    for cmd in res.next:
        out.print(f"  {escape(cmd)}")
