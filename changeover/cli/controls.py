"""Verbs that steer the running daemon and its proxy without deploying: re-read the config, hand the
proxy over, stop everything, hold requests (pause / resume) or answer with the maintenance page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from changeover import commands
from changeover.cli.common import DEFAULT, ConfigOpt, JsonOpt, daemon_at, err, print_json, ts
from changeover.errors import UsageError as ChangeoverUsage


def reload(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Have the running daemon re-read changeover.toml and .env (deploys do so by themselves)."""
    result = commands.reload(daemon_at(config))
    if json_out:
        print_json(result)
    else:
        err.print(f"re-read {result['file']}")


def reload_proxy(config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Replace the proxy worker without dropping a request (after upgrading changeover)."""
    result = commands.reload_proxy(daemon_at(config))
    if json_out:
        print_json(result)
    else:
        err.print(f"proxy handed over from pid {result['old_pid']} to pid {result['pid']}")


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


def pause(timeout: Annotated[str | None, typer.Option("--timeout", help="Seconds (or '30s', '2m') before the "
                                                       "proxy resumes by itself ([proxy] pause_timeout).")] = None,
          reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
          config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Hold new requests briefly (e.g. a database failover): none is forwarded or failed; `resume`
    sends them on in order. Requests in flight finish."""
    result = commands.pause(daemon_at(config), timeout=_duration(timeout, "--timeout"), reason=reason)
    if json_out:
        print_json(result)
        return
    p = result.get("pause") or {}
    err.print(f"[yellow]paused[/]: new requests are held until `changeover resume`, at most "
              f"{p.get('timeout') or 0:g}s (until {ts(p.get('until'))}), then the proxy resumes by itself")
    if result.get("maintenance"):
        err.print("maintenance is on: released requests get the maintenance page")


def resume(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
           config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """End a pause: the held requests go to the live release in the order they arrived."""
    result = commands.resume(daemon_at(config), reason=reason)
    if json_out:
        print_json(result)
    elif result.get("was_paused") or result.get("released"):
        err.print(f"[green]resumed[/]: {result.get('released', 0)} held request(s) sent on in order")
    else:
        err.print("not paused; nothing to resume")


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
        print_json(result)
        return
    m = result.get("maintenance") or {}
    err.print(f"[yellow]maintenance on[/]: every request gets 503 (page: {escape(str(m.get('page')))}"
              f", Retry-After: {m.get('retry_after')}); `changeover maintenance off` serves again")


def maintenance_off(reason: Annotated[str | None, typer.Option("--reason", help="Why (kept in history).")] = None,
                    config: ConfigOpt = DEFAULT, json_out: JsonOpt = False) -> None:
    """Serve the live release again."""
    result = commands.maintenance(daemon_at(config), False, reason=reason)
    if json_out:
        print_json(result)
    elif result.get("was_on"):
        err.print("[green]maintenance off[/]: serving the live release again")
    else:
        err.print("maintenance was not on; serving")
