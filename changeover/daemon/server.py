"""`changeover serve`: the per-host daemon.

It owns the state, the slot supervisor, the proxy worker (a process of its own, so traffic flows
while the daemon restarts) and the control API on `.changeover/control.sock`. On start it adopts
what is still running and settles anything a crash left half-done (daemon/recovery.py).
Stopping the daemon (SIGTERM, Ctrl-C) leaves the proxy and the app serving; `changeover down`
stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import uvloop

from changeover import rpc
from changeover.config import Config
from changeover.daemon.gates import Gates
from changeover.daemon.pipeline import Pipeline
from changeover.daemon.recovery import configure_proxy, recover, routing
from changeover.daemon.slots import SlotManager, other
from changeover.errors import ChangeoverError, DaemonError
from changeover.proxy.remote import ProxyProcess
from changeover.state import SLOTS, State

log = logging.getLogger("changeover.daemon")
SYNC_INTERVAL = 0.2
PROXY_CHECK_INTERVAL = 0.5   # how often the daemon checks that the proxy worker answers
CLOSE_TIMEOUT = 15.0         # seconds each part of a stopping daemon may take before it is left behind
PROXY_MISSES = 2             # unanswered checks in a row before it is restarted
INCIDENTS = ("instance.crashed", "instance.gave_up", "instance.restarted", "instance.lost", "recovery.failed",
             "recovery.restarted", "proxy.restarted", "proxy.restart_failed")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state = State(self.state_dir / "state.db")
        self.proxy = ProxyProcess(config.proxy, self.state_dir)
        self.slots = SlotManager(config, self.state, self.proxy)
        self.gates = Gates(config, self.state, self.slots)
        self.pipeline = Pipeline(config, self.state, self.slots, self.gates)
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self._server: asyncio.AbstractServer | None = None
        self._down = False
        self._handover = False

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._claim_pidfile()
        how = await self.proxy.ensure()
        self.state.event("daemon.start", proxy=how, proxy_pid=self.proxy.pid, pid=os.getpid())
        await recover(self.state, self.slots, self.proxy)
        if how == "adopted" and self.proxy.settings_differ:
            # [proxy] changed since the worker started: apply it without a gap.
            await self.reload_proxy("the [proxy] settings changed")
        await self.gates.start(self.proxy)
        self._server = await rpc.serve(self.config.socket_path, {
            "status": self.h_status, "deploy": self.h_deploy, "rollback": self.h_rollback,
            "stop_standby": self.h_stop_standby, "history": self.h_history, "down": self.h_down,
            "ping": self.h_ping, "metrics": self.h_metrics, "reload_proxy": self.h_reload_proxy,
        })
        log.info("changeover daemon ready (pid %d): proxy on %s (%s, pid %s), control socket %s",
                 os.getpid(), self.config.proxy.listen, how, self.proxy.pid, self.config.socket_path)

    async def run(self) -> None:
        await self.start()
        watchdog = asyncio.get_running_loop().create_task(self._watch_proxy())
        try:
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), SYNC_INTERVAL)
                try:
                    await self.slots.sync()
                except Exception:
                    log.exception("syncing slots failed")
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await self.close()

    async def _watch_proxy(self) -> None:
        """The proxy worker must always run: if it stops answering (crashed, killed), start a new
        one at once and tell it the slots and the live one, as recovery does."""
        misses = 0
        while True:
            await asyncio.sleep(PROXY_CHECK_INTERVAL)
            if self._handover:
                continue
            info = await self.proxy.ping()
            if info is not None:
                misses = 0
                continue
            misses += 1
            if misses < PROXY_MISSES:
                continue
            log.error("the proxy worker (pid %s) stopped answering: starting a new one", self.proxy.pid)
            try:
                await self.proxy.ensure(routing(self.state, self.slots))  # routable before it listens
                await configure_proxy(self.state, self.slots, self.proxy)
                self.gates.reset_mirror()
                self.state.event("proxy.restarted", pid=self.proxy.pid)
                misses = 0
            except ChangeoverError as e:
                log.error("restarting the proxy failed: %s", e)
                self.state.event("proxy.restart_failed", error=str(e))

    async def close(self) -> None:
        log.info("daemon stopping%s", " (down: stopping the app and the proxy)" if self._down else "")
        if self._server is not None:
            self._server.close()
        await self._bounded("the deploy pipeline", self.pipeline.close())
        await self._bounded("the monitor", self.gates.close())
        if self._down:
            for slot in SLOTS:
                await self.slots.supervisor.stop_slot(slot)
                self.slots.transition(slot, "empty", release_id=None, instances=[], why="changeover down")
            await self.proxy.shutdown()
        await self.slots.supervisor.close()
        self.state.event("daemon.stop", down=self._down)
        self.state.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "daemon.pid").unlink()

    @staticmethod
    async def _bounded(what: str, work: Awaitable[None]) -> None:
        """A stop must never hang on one part: give it CLOSE_TIMEOUT, then say what was stuck."""
        try:
            await asyncio.wait_for(work, CLOSE_TIMEOUT)
        except TimeoutError:
            stuck = [f"{t.get_name()} at {t.get_stack(limit=1)}" for t in asyncio.all_tasks()
                     if t is not asyncio.current_task()]
            log.error("stopping %s took over %gs; going on (tasks: %s)", what, CLOSE_TIMEOUT, stuck)

    def _claim_pidfile(self) -> None:
        pidfile = self.state_dir / "daemon.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise DaemonError(f"a daemon is already running for this config (pid {pid})") from None
            else:
                raise DaemonError(f"a daemon is already running for this config (pid {pid}); "
                                  "stop it first") from None
        pidfile.write_text(f"{os.getpid()}\n")

    async def reload_proxy(self, why: str) -> dict[str, Any]:
        """Replace the proxy worker (new code after an upgrade, or new [proxy] settings) without
        dropping a request: the successor shares the port, the old one finishes and exits."""
        if self.pipeline.active is not None:
            raise self.pipeline.busy_error()
        async with self.pipeline._lock:
            self._handover = True
            old = self.proxy.pid
            try:
                await self.proxy.handover(routing(self.state, self.slots),
                                          lambda p: configure_proxy(self.state, self.slots, p))
            finally:
                self._handover = False
            self.gates.reset_mirror()
        self.state.event("proxy.handover", old_pid=old, pid=self.proxy.pid, why=why)
        log.info("proxy handover: pid %s -> %s (%s)", old, self.proxy.pid, why)
        return {"old_pid": old, "pid": self.proxy.pid}

    async def h_reload_proxy(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.reload_proxy(str(args.get("why") or "changeover reload-proxy"))

    # -- control API ----------------------------------------------------------------------------
    async def h_ping(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime": time.time() - self.started_at}

    async def h_status(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.status()

    async def status(self) -> dict[str, Any]:
        live = self.state.live_slot()
        standby_name = other(live) if live else None
        out: dict[str, Any] = {"live": None, "standby": None, "deploying": self.pipeline.active is not None}
        if live:
            out["live"] = self._slot_info(live)
        if standby_name:
            s = self.state.slot(standby_name)
            if s.state != "empty":
                info = self._slot_info(standby_name)
                info["state"] = ("warm" if s.state == "standby" and self.slots.warm(standby_name) else s.state)
                out["standby"] = info
        a = self.pipeline.active
        if a is not None:
            out["deployment"] = {"id": a.id, "kind": a.kind, "version": a.version, "phase": a.phase,
                                 "started_at": a.started}
        out["proxy"] = {"listen": self.config.proxy.listen, "pid": self.proxy.pid}
        # Crashes and restarts of the last hour: a crash-looping instance must be visible here.
        recent = time.time() - 3600
        out["incidents"] = [e for e in self.state.events(limit=200)
                            if e["ts"] >= recent and e["kind"] in INCIDENTS][:10]
        out["metrics"] = self.gates.live_metrics()
        return out

    def _slot_info(self, slot: str) -> dict[str, Any]:
        s = self.state.slot(slot)
        rel = self.state.release(s.release_id)
        return {"slot": slot, "version": rel.version if rel else None, "since": s.updated_at,
                "instances": [{"pid": r.pid, "port": r.port} for r in self.slots.supervisor.records(slot)]}

    async def h_deploy(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.pipeline.deploy(str(args["version"]), str(args["path"]), emit,
                                          wait=bool(args.get("wait")), env=args.get("env"),
                                          actor=args.get("actor"))

    async def h_rollback(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.pipeline.rollback(emit, reason=args.get("reason"), actor=args.get("actor"),
                                            schema=bool(args.get("schema")),
                                            allow_data_loss=bool(args.get("allow_data_loss")))

    async def h_stop_standby(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.pipeline.stop_standby()

    async def h_history(self, args: dict[str, Any], emit: rpc.Emit) -> list[dict[str, Any]]:
        return self.state.history(limit=int(args.get("limit", 20)))

    async def h_metrics(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return self.gates.live_metrics()

    async def h_down(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        # "Stop everything" wins over a deploy in progress: it is cancelled (its steps are marked
        # failed) and the deployment is settled as interrupted.
        a = self.pipeline.active
        if a is not None and a.id:
            self.state.set_deployment(a.id, "failed", "stopped by `changeover down`")
        log.info("`changeover down` requested")
        self._down = True
        self.stopping.set()
        return {"stopping": True}


def setup_logging(state_dir: Path, verbose: bool = False) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fh = logging.FileHandler(state_dir / "daemon.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(sh)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(config: Config) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT or `changeover down`."""
    setup_logging(config.state_dir)

    async def main() -> None:
        daemon = Daemon(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stopping.set)
        await daemon.run()

    uvloop.run(main())
