"""`changeover front status|handover`: the shared front of a project's `[proxy] listen`, for ops.

Both talk to the front itself (not to the project's daemon), found from the project's
changeover.toml (`[proxy] front_socket`, or the default one per port).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeover import config as config_mod
from changeover.errors import ChangeoverError, ConfigError
from changeover.proxy.shared import SharedFront, front_info, front_socket_path

app = typer.Typer(no_args_is_help=True, help="The shared front several projects' host names are routed by.")
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 400)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 400)
ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="Path to changeover.toml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _shared(path: Path) -> SharedFront:
    cfg = config_mod.load(path)
    if not cfg.proxy.shared:
        raise ConfigError("this project does not use a shared front (set [proxy] shared = true and hosts)",
                          file=str(cfg.file), key="proxy.shared")
    return SharedFront(cfg.proxy, cfg.state_dir, str(cfg.file))


@app.command("status")
def status(config: ConfigOpt = Path(config_mod.DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """The front on this project's port: its process, and every project's host names and live slot."""
    cfg = config_mod.load(config)
    sock = front_socket_path(cfg.proxy)
    info = asyncio.run(front_info(sock))
    if info is None:
        raise ChangeoverError(f"no shared front answers on {sock} (a project's daemon starts it)")
    if json_out:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    out.print(f"shared front on {info['listen']} (pid {info['pid']}), control socket {sock}")
    t = Table(show_header=True, header_style="bold", box=None)
    for col in ("project", "hosts", "live"):
        t.add_column(col)
    for s in info.get("sites", []):
        mine = " (this one)" if s.get("config") == str(cfg.file) else ""
        t.add_row(escape(str(s["config"])) + mine, ", ".join(s["hosts"]), s.get("live") or "-")
    out.print(t)


@app.command("handover")
def handover(config: ConfigOpt = Path(config_mod.DEFAULT_CONFIG), json_out: JsonOpt = False) -> None:
    """Replace the front process by a new one (after upgrading changeover) without a failed request."""
    front = _shared(config)

    async def go() -> dict[str, Any]:
        return await front.front_handover()

    result = asyncio.run(go())
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        err.print(f"shared front handed over from pid {result['old_pid']} to pid {result['pid']}")
