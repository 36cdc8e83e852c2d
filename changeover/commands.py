"""One plain function per verb, config first (alembic style). The CLI renders what they return.

Verbs that act on the running system go through the daemon's control socket; `config check` and
`logs` read local files and work without a daemon.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from changeover import api, rpc
from changeover.api import Op
from changeover.config import Config, Location
from changeover.daemon.logs import tail_lines
from changeover.errors import DaemonError, UsageError
from changeover.redact import redact_obj
from changeover.state import SLOTS, State

Progress = Callable[[dict[str, Any]], None]
Daemon = Config | Location   # verbs that talk to a running daemon need only where it lives


def _actor() -> str:
    try:
        return f"{getpass.getuser()}@{os.uname().nodename}"
    except (KeyError, OSError):
        return "unknown"


def _stream(config: Daemon, op: Op, args: dict[str, Any], progress: Progress | None,
            timeout: float | None = None) -> Any:
    async def run() -> Any:
        result = None
        async for msg in rpc.stream(config.socket_path, str(op), args, timeout=timeout, protocol=api.PROTOCOL):
            if "result" in msg:
                result = msg["result"]
            elif progress is not None:
                progress(msg)
        return result

    return asyncio.run(run())


def serve(config: Config) -> None:
    from changeover.daemon.server import serve as run_daemon

    run_daemon(config)


def parse_env(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UsageError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def deploy(config: Daemon, version: str, path: str | None, *, wait: bool = False, env: dict[str, str] | None = None,
           no_switch: bool = False, progress: Progress | None = None, git: str | None = None,
           archive: str | None = None) -> dict[str, Any]:
    """Deploy VERSION from directory PATH; returns once it is live (or, with wait, finalised;
    with no_switch, once it is prepared: running, verified privately, not switched). With git (a
    ref) or archive (a .tar.gz) instead of a path, the daemon exports it into releases/VERSION."""
    if sum(x is not None for x in (path, git, archive)) != 1:
        raise UsageError("deploy needs exactly one of --path DIR, --git REF, --archive FILE.tar.gz")
    if archive is not None:
        # Exported by the daemon, which runs on this host: it gets the file's absolute path.
        archive = str(Path(archive).expanduser().absolute())
        if not Path(archive).is_file():
            raise UsageError(f"--archive {archive}: no such file")
    app_dir = ""
    if path is not None:
        app_dir = str(Path(path).expanduser().absolute())
        if not Path(app_dir).is_dir():
            raise UsageError(f"--path {path}: no such directory")
    args = api.DeployArgs(version=version, path=app_dir, wait=wait, env=env or {}, actor=_actor(),
                          no_switch=no_switch, git=git, archive=archive)
    return dict(_stream(config, Op.DEPLOY, api.encode(args), progress))


def switch(config: Daemon, *, wait: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Switch the prepared release live (after `deploy --no-switch`), then observe it."""
    return dict(_stream(config, Op.SWITCH, api.encode(api.SwitchArgs(wait=wait, actor=_actor())), progress))


def promote(config: Daemon) -> dict[str, Any]:
    """End the observation window now and finalise the deployment."""
    return dict(_stream(config, Op.PROMOTE, api.encode(api.PromoteArgs(actor=_actor())), None))


def abort(config: Daemon, *, reason: str | None = None) -> dict[str, Any]:
    """Stop the deployment in progress: unwound before the switch, switched back after it."""
    return dict(_stream(config, Op.ABORT, api.encode(api.AbortArgs(reason=reason, actor=_actor())), None))


def reload(config: Daemon) -> dict[str, Any]:
    """Have the running daemon re-read changeover.toml and .env now (as SIGHUP does)."""
    return dict(_stream(config, Op.RELOAD, {}, None, timeout=120))


def rollback(config: Daemon, *, reason: str | None = None, schema: bool = False, allow_data_loss: bool = False,
             progress: Progress | None = None) -> dict[str, Any]:
    """Back to the previous release (code and config); with schema, also undo its migrations."""
    args = api.RollbackArgs(reason=reason, actor=_actor(), schema=schema, allow_data_loss=allow_data_loss)
    return dict(_stream(config, Op.ROLLBACK, api.encode(args), progress))


def drill(config: Daemon, *, max_reaction: float | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Rehearse every rollback path on a drill copy of the live release (daemon/drill.py)."""
    args = api.DrillArgs(actor=_actor(), max_reaction=max_reaction)
    return dict(_stream(config, Op.DRILL, api.encode(args), progress))


def status(config: Daemon) -> dict[str, Any]:
    return dict(_stream(config, Op.STATUS, {}, None, timeout=10))


def history(config: Daemon, limit: int = 20, traffic: bool = False) -> list[dict[str, Any]]:
    """From the daemon when it runs, else straight from the state file (history survives it).
    With traffic, pause / resume / maintenance events are rows too (their id is None)."""
    if config.socket_path.exists():
        try:
            return list(_stream(config, Op.HISTORY, api.encode(api.HistoryArgs(limit=limit, traffic=traffic)), None,
                                timeout=10))
        except DaemonError:
            pass  # a socket left by a daemon that was killed: the state file has the history
    db = config.state_dir / "state.db"
    if not db.exists():
        return []
    state = State(db, readonly=True)
    try:
        if traffic:
            from changeover.daemon.traffic import merge_history

            return merge_history(state.history(limit), state.mode_events(limit), limit)
        return state.history(limit)
    finally:
        state.close()


def pause(config: Daemon, *, timeout: float | None = None, reason: str | None = None) -> dict[str, Any]:
    """Hold new requests (not forwarded, not failed) until `resume`, or `timeout` seconds (default
    [proxy] pause_timeout), when the proxy resumes by itself; held requests are then sent in order."""
    args = api.PauseArgs(timeout=timeout, actor=_actor(), reason=reason)
    return dict(_stream(config, Op.PAUSE, api.encode(args), None, timeout=30))


def resume(config: Daemon, *, reason: str | None = None) -> dict[str, Any]:
    """End a pause: what it held goes to the live release in arrival order."""
    return dict(_stream(config, Op.RESUME, api.encode(api.ResumeArgs(actor=_actor(), reason=reason)), None,
                        timeout=30))


def maintenance(config: Daemon, on: bool, *, page: str | None = None, retry_after: int | None = None,
                reason: str | None = None) -> dict[str, Any]:
    """On: every request gets 503 with the page (FILE, else [proxy] maintenance_page, else a
    built-in one) and Retry-After; requests in flight finish. Off: back to serving."""
    if page is not None:
        # read by the daemon, which runs on this host: it gets the file's absolute path
        path = Path(page).expanduser().absolute()
        if not path.is_file():
            raise UsageError(f"--page {page}: no such file" if not path.exists() else f"--page {page}: not a file")
        page = str(path)
    if retry_after is not None and not 0 <= retry_after <= 86400:
        raise UsageError(f"--retry-after {retry_after}: expected whole seconds, 0 to 86400")
    args = api.MaintenanceArgs(on=on, page=page, retry_after=retry_after, actor=_actor(), reason=reason)
    return dict(_stream(config, Op.MAINTENANCE, api.encode(args), None, timeout=30))


def stop_standby(config: Daemon) -> dict[str, Any]:
    return dict(_stream(config, Op.STOP_STANDBY, {}, None))


def reload_proxy(config: Daemon) -> dict[str, Any]:
    """Hand traffic to a new proxy worker (new code, new [proxy] settings) without a gap."""
    return dict(_stream(config, Op.RELOAD_PROXY, {}, None, timeout=None))


def down(config: Daemon) -> dict[str, Any]:
    """Drain and stop the app, stop the proxy and the daemon; returns when that is done."""
    return dict(_stream(config, Op.DOWN, {}, None, timeout=None))


def metrics(config: Daemon) -> dict[str, Any]:
    return dict(_stream(config, Op.METRICS, {}, None, timeout=5))


def config_check(config: Config) -> dict[str, Any]:
    """The resolved config with secrets masked."""
    return dict(redact_obj(config.resolved))


def log_files(config: Daemon, slot: str | None = None) -> list[Path]:
    """Log files of the slot's current release (both slots when none is named; the live one first)."""
    if slot is not None and slot not in SLOTS:
        raise UsageError(f"--slot {slot}: expected one of {', '.join(SLOTS)}")
    logs = config.state_dir / "logs"
    names = [slot] if slot else list(SLOTS)
    db = config.state_dir / "state.db"
    out: list[Path] = []
    if db.exists():
        state = State(db, readonly=True)
        try:
            live = state.live_slot()
            if slot is None and live is not None:
                names.sort(key=lambda n: n != live)
            for n in names:
                s = state.slot(n)
                out += [Path(r["log_path"]) for r in s.instances if r.get("log_path")]
        finally:
            state.close()
    if not out:  # nothing running: show the newest files of the slot(s)
        for n in names:
            files = sorted((logs / n).glob("*.log"), key=lambda p: p.stat().st_mtime)
            out += files[-1:]
    return out


def logs(config: Daemon, slot: str | None = None, lines: int = 50) -> Iterator[tuple[Path, str]]:
    for path in log_files(config, slot):
        for line in tail_lines(path, lines):
            yield path, line
