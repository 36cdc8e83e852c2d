"""`changeover serve`: the per-host daemon.

It owns the state, the slot supervisor, the data plane (a process of its own, so traffic flows
while the daemon restarts) and the control API on `.changeover/control.sock` (changeover.api).
On start it adopts what is still running, settles anything a crash left half-done and carries on
a deployment that had gone live (daemon/recovery.py). Every deploy and rollback re-reads
`changeover.toml` and `.env`; `changeover reload` (or SIGHUP) does so for the running daemon.
Stopping the daemon (SIGTERM, Ctrl-C) leaves the proxy and the app serving; `changeover down`
drains and stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from changeover import api, rpc
from changeover import config as config_mod
from changeover.api import Op
from changeover.config import Config
from changeover.daemon import cancel
from changeover.daemon import logs as logfiles
from changeover.daemon import status as status_view
from changeover.daemon.control_api import ControlApi
from changeover.daemon.model import SlotState
from changeover.daemon.pipeline import Pipeline
from changeover.daemon.recovery import configure_proxy, recover, routing
from changeover.daemon.slots import SlotManager
from changeover.daemon.telemetry import Telemetry
from changeover.daemon.traffic import TrafficModes
from changeover.daemon.verification import Verification
from changeover.errors import ChangeoverError, ConfigError, DaemonError
from changeover.proxy.control import ProxyControl
from changeover.state import SLOTS, State

log = logging.getLogger("changeover.daemon")
SYNC_INTERVAL = 0.2
SYNC_TIMEOUT = 10.0   # seconds one sync of the slots with the proxy may take
PROXY_CHECK_INTERVAL = 0.5   # how often the daemon checks that the proxy worker answers
CLOSE_TIMEOUT = 15.0         # seconds each part of a stopping daemon may take before it is left behind
LEFTOVER_TIMEOUT = 5.0       # seconds a task still running once the daemon stopped gets to end
PROXY_MISSES = 2             # unanswered checks in a row before it is restarted


def make_control(config: Config) -> ProxyControl:
    try:
        from changeover.proxy.engines import make_control as make
    except ImportError:  # the engine registry is optional while only the embedded proxy exists
        from changeover.proxy.remote import ProxyProcess

        return ProxyProcess(config.proxy, config.state_dir)
    return make(config.proxy, config.state_dir, str(config.file))


class Daemon(ControlApi):
    def __init__(self, config: Config) -> None:
        if config.app is None:
            raise ConfigError("[app] is needed to run the daemon (command, health_path)", file=str(config.file),
                              key="app")
        self.config = config
        self.state_dir = config.state_dir
        self.state = State(self.state_dir / "state.db")
        self.state.retention = config.retention   # [state] keep_*: the state prunes itself (state.py)
        self.proxy = make_control(config)
        self.slots = SlotManager(config, self.state, self.proxy)
        self.telemetry = Telemetry(config.monitor, self.proxy, str(config.file))
        # pause and maintenance (daemon/traffic.py); in maintenance the checks skip the proxy's page
        self.traffic = TrafficModes(self.state, self.slots, self.proxy, lambda: self.config.proxy)
        self.verification = Verification(self.slots, self.traffic.check_url(self._proxy_url))
        self.pipeline = Pipeline(self.state, self.slots, self.verification, self.telemetry)
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self._server: asyncio.AbstractServer | None = None
        self._down = False
        self._handover = False
        self._pidfd: int | None = None

    def _proxy_url(self) -> str:
        host = self.config.proxy.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        port = self.proxy.port or self.config.proxy.port
        tls = self.config.proxy.tls
        if tls is not None and tls.https_redirect:   # HTTP answers 301: go the way the public goes
            host = tls.host if tls.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            return f"https://{host}:{tls.port}"
        return f"http://{host}:{port}"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._claim_pidfile()
        how = await self.proxy.ensure()
        self.state.event("daemon.start", proxy=how, proxy_pid=self.proxy.pid, pid=os.getpid())
        resumes = await recover(self.state, self.slots, self.proxy, adopted=how == "adopted")
        if how == "adopted" and self.proxy.settings_differ:
            # [proxy] changed since the worker started: apply it without a gap.
            await self.reload_proxy("the running proxy has other [proxy] settings or an older control protocol")
        await self.traffic.restore()      # pause / maintenance as recorded (a lapsed pause is not re-applied)
        await self.telemetry.start(self.state.live_slot())
        self.pipeline.arm_expiry()
        self.slots.linger.arm()            # processes kept for tunnels by a previous daemon
        for r in resumes:
            await self.pipeline.resume(r.deployment, r.at, self.config)
        handlers: dict[str, Callable[[dict[str, Any], rpc.Emit], Awaitable[Any]]] = {
            Op.PING: self.h_ping, Op.STATUS: self.h_status, Op.HISTORY: self.h_history, Op.METRICS: self.h_metrics,
            Op.DEPLOY: self.h_deploy, Op.PREPARE: self.h_prepare, Op.SWITCH: self.h_switch,
            Op.PROMOTE: self.h_promote, Op.ABORT: self.h_abort, Op.ROLLBACK: self.h_rollback,
            Op.STOP_STANDBY: self.h_stop_standby, Op.RELOAD: self.h_reload, Op.RELOAD_PROXY: self.h_reload_proxy,
            Op.DOWN: self.h_down,
            Op.SERIES: self.h_series, Op.RELEASES: self.h_releases,
            Op.DRILL: self.h_drill,
            Op.PAUSE: self.h_pause, Op.RESUME: self.h_resume, Op.MAINTENANCE: self.h_maintenance,
        }
        self._server = await rpc.serve(self.config.socket_path, {str(k): v for k, v in handlers.items()},
                                       protocol=api.PROTOCOL)
        # [dashboard] hook: the web dashboard, a client of the control API above, in this loop
        # (changeover/dashboard/service.py); None when disabled or its port is taken.
        from changeover.dashboard import service as dashboard
        self.dashboard: Any = await dashboard.start(self.config)
        # [fleet] hook: this host joins a fleet coordinated through etcd (changeover/fleet/agent.py).
        self.fleet: Any = None
        if self.config.fleet is not None:
            from changeover.fleet.agent import Agent
            self.fleet = Agent(self, self.config.fleet)
            await self.fleet.start()
        # [proxy.tls] hook: ACME certificates, alerts on certificate files (changeover/certs/manager.py).
        self.certs: Any = None
        if self.config.proxy.tls is not None:
            from changeover.certs.manager import CertManager
            self.certs = CertManager(self.config.proxy.tls, self.config.acme, self.telemetry.notify, self.state.event)
            self.certs.start()
        log.info("changeover daemon ready (pid %d): proxy on %s (%s %s, pid %s), control socket %s",
                 os.getpid(), self.config.proxy.listen, self.config.proxy.engine, how, self.proxy.pid,
                 self.config.socket_path)

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        # The loops run beside this wait, which depends on nothing else: a proxy call that is slow
        # or never answers cannot keep the daemon from acting on SIGTERM or `down`.
        background = [loop.create_task(self._watch_proxy(), name="proxy-watchdog"),
                      loop.create_task(self._sync_slots(), name="slot-sync")]
        try:
            await self.stopping.wait()
        finally:
            # cancelled until they are done (a single cancel can be dropped on 3.11: daemon/cancel.py)
            await cancel.stop(background, CLOSE_TIMEOUT)
            await self.close()

    async def _sync_slots(self) -> None:
        """Bring state and proxy in line with the supervisor after instance restarts."""
        while not self.stopping.is_set():
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                async with asyncio.timeout(SYNC_TIMEOUT):
                    await self.slots.sync()
                self.traffic.tick()   # a pause past its timeout: the proxy resumed, the state follows
            except TimeoutError:
                log.error("syncing slots with the proxy took over %gs: given up, tried again at the next "
                          "change", SYNC_TIMEOUT)
            except Exception:
                log.exception("syncing slots failed")

    async def _watch_proxy(self) -> None:
        """The proxy worker must always run: if it stops answering (crashed, killed), start a new
        one at once and tell it the slots and the live one, as recovery does."""
        misses = 0
        while not self.stopping.is_set():   # ends by itself too should a cancel be dropped
            await asyncio.sleep(PROXY_CHECK_INTERVAL)
            if self._handover or self._down:   # a handover replaces it; `down` stopped it on purpose
                continue
            try:
                info = await self.proxy.ping()
            except ChangeoverError as e:   # an answer that is an error: not a working proxy either
                log.warning("the proxy answered its ping with an error: %s", e)
                info = None
            if info is not None:
                misses = 0
                continue
            misses += 1
            if misses < PROXY_MISSES:
                continue
            log.error("the proxy (pid %s) stopped answering: starting a new one", self.proxy.pid)
            try:
                # routable, and in its pause / maintenance mode, before it listens
                await self.proxy.ensure({**routing(self.state, self.slots), "mode": self.traffic.wire()})
                await configure_proxy(self.state, self.slots, self.proxy)
                await self.traffic.restore()
                self.telemetry.reset_mirror()
                self.state.event("proxy.restarted", pid=self.proxy.pid)
                misses = 0
            except ChangeoverError as e:
                log.error("restarting the proxy failed: %s", e)
                self.state.event("proxy.restart_failed", error=str(e))

    async def close(self) -> None:
        log.info("daemon stopping%s", " (down: the app and the proxy were stopped)" if self._down else "")
        await self._stop_deployment()   # first: a deploy goes no further once SIGTERM is in
        if getattr(self, "dashboard", None) is not None:   # [dashboard] hook: stop serving pages first
            await self._bounded("the dashboard", self.dashboard.close())
        if self._server is not None:
            self._server.close()
        if getattr(self, "certs", None) is not None:   # [proxy.tls] hook: no new ACME order
            await self._bounded("the certificate manager", self.certs.close())
        if getattr(self, "fleet", None) is not None:   # [fleet] hook: leave the fleet (changeover/fleet)
            await self._bounded("the fleet agent", self.fleet.close())
        await self._bounded("the deploy pipeline", self.pipeline.close())
        await self._bounded("the monitor", self.telemetry.close())
        await self._bounded("the tunnel keeper", self.slots.linger.close())
        await self._bounded("the supervisor", self.slots.supervisor.close())
        self.state.event("daemon.stop", down=self._down)
        self.state.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "daemon.pid").unlink()   # still locked: a successor re-checks the inode
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _stop_deployment(self) -> None:
        """Stop the active deployment where it is, undoing nothing (SIGTERM, down): the next daemon
        settles or resumes it from its state. Cancelled again should a cancel be dropped."""
        a = self.pipeline.active
        if a is not None and a.task is not None:
            self.pipeline.closing = True
            a.steps.halted = True
            await cancel.stop([a.task], CLOSE_TIMEOUT)

    @staticmethod
    async def _bounded(what: str, work: Awaitable[None]) -> None:
        """A stop must never hang on one part: give it CLOSE_TIMEOUT, then say what was stuck, stop
        it (daemon/cancel.py) and go on. Its failure is logged: the rest of the stop still runs."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        if not done:
            stuck = [cancel.where(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            log.error("stopping %s took over %gs; going on (tasks: %s)", what, CLOSE_TIMEOUT, stuck)
            await cancel.stop([task], LEFTOVER_TIMEOUT)
        elif not task.cancelled() and task.exception() is not None:
            log.error("stopping %s failed", what, exc_info=task.exception())

    def _claim_pidfile(self) -> None:
        """Hold an exclusive flock on daemon.pid for the daemon's life. The lock, not the pid in the
        file, says whether a daemon runs: a stale file (a recycled pid after a reboot, a killed
        daemon not yet reaped) holds no lock, so it never keeps the site unsupervised."""
        pidfile = self.state_dir / "daemon.pid"
        while True:
            fd = os.open(pidfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise DaemonError(f"a daemon is already running for this config (pid {held or '?'}); "
                                  "stop it first") from None
            try:   # the daemon that held it may have unlinked the file just before we locked it
                same = os.fstat(fd).st_ino == os.stat(pidfile).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._pidfd = fd   # kept open (not inherited by children): the lock lasts as long as we do

    # -- the config, read at every deploy ----------------------------------------------------------
    async def fresh_config(self) -> Config:
        """changeover.toml and .env as they are now. An invalid file raises (file, key, expected) and
        changes nothing; a changed [proxy] is applied by a hitless handover first."""
        config = await asyncio.to_thread(config_mod.load, self.config.file)
        if config.app is None:
            raise ConfigError("[app] is needed to deploy (command, health_path)", file=str(config.file), key="app")
        if config.proxy != self.config.proxy:
            if config.proxy.engine != self.config.proxy.engine:
                raise ConfigError(f"changed from {self.config.proxy.engine!r} to {config.proxy.engine!r}: a new "
                                  "data plane needs a daemon restart (`changeover down`, then `changeover serve`)",
                                  file=str(config.file), key="proxy.engine")
            if config.proxy.shared != self.config.proxy.shared:
                raise ConfigError("changed: moving to or from a shared front needs a daemon restart (`changeover "
                                  "down`, then `changeover serve`)", file=str(config.file), key="proxy.shared")
            self.config = dataclasses.replace(self.config, proxy=config.proxy)
            self.proxy.settings = config.proxy
            await self.reload_proxy("the [proxy] settings changed")
        self.config = config
        return config

    async def h_reload(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        config = await self.fresh_config()
        if self.pipeline.active is None:
            self.pipeline.apply(config)
        self.state.event("daemon.reload", file=str(config.file))
        log.info("config re-read from %s", config.file)
        return {"file": str(config.file), "applied": self.pipeline.active is None}

    def sighup(self) -> None:
        async def go() -> None:
            try:
                await self.h_reload({}, _silent)
            except ChangeoverError as e:
                log.error("reload (SIGHUP) refused: %s", e)

        self.pipeline.spawn(go())

    async def reload_proxy(self, why: str) -> dict[str, Any]:
        """Replace the proxy worker (new code after an upgrade, or new [proxy] settings) without
        dropping a request: the successor shares the port, the old one finishes and exits."""
        async with self.pipeline.exclusive():
            self._handover = True
            old = self.proxy.pid
            try:
                async def configure(p: Any) -> None:
                    await configure_proxy(self.state, self.slots, p)
                    await self.traffic.restore(p)   # preloaded already (wire); checked again

                await self.proxy.handover({**routing(self.state, self.slots), "mode": self.traffic.wire()}, configure)
            finally:
                self._handover = False
            self.telemetry.reset_mirror()
        self.state.event("proxy.handover", old_pid=old, pid=self.proxy.pid, why=why)
        log.info("proxy handover: pid %s -> %s (%s)", old, self.proxy.pid, why)
        return {"old_pid": old, "pid": self.proxy.pid}

    async def h_reload_proxy(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.ReloadProxyArgs, args)
        return await self.reload_proxy(a.why or "changeover reload-proxy")

    # -- control API: the verbs are control_api.py's; `down` ends the daemon itself ----------------
    async def status(self) -> dict[str, Any]:
        return await status_view.report(self)

    async def h_down(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        """Stop everything, in the order that fails no request: stop routing new requests, drain what
        is in flight (up to drain_timeout), stop the app, stop the proxy; answer when it is done."""
        log.info("`changeover down` requested")
        a = self.pipeline.active
        await self._stop_deployment()   # everything stops anyway: the deployment is recorded as stopped
        if a is not None and a.id:
            row = self.state.deployment(a.id)
            if row is not None and not row.status.finished:
                self.state.transition_deployment(a.id, "failed", "stopped by `changeover down`")
        self._down = True
        stopped = []
        live = self.state.live_slot()
        order = [s for s in SLOTS if s != live] + ([live] if live else [])
        with contextlib.suppress(ChangeoverError):
            await self.traffic.release_for_down()   # held requests go on to the app before it stops
        with contextlib.suppress(ChangeoverError):
            await self.proxy.switch(None)   # new requests: 503; those in flight finish
        for slot in order:
            st = self.state.slot(slot)
            if st.state == SlotState.EMPTY and not self.slots.supervisor.records(slot):
                continue
            with contextlib.suppress(ChangeoverError):
                await self.slots.drain_for_down(slot)
            await self.slots.supervisor.stop_slot(slot)
            if st.state != SlotState.STOPPING:
                self.state.transition_slot(slot, SlotState.STOPPING, why="changeover down")
            self.state.transition_slot(slot, SlotState.EMPTY, release_id=None, instances=[], why="changeover down")
            stopped.append(slot)
        await self.proxy.shutdown()
        await self.slots.linger.stop_due(float("inf"))   # processes kept for tunnels (daemon/linger.py)
        self.stopping.set()
        return {"stopping": True, "stopped": stopped}


async def _silent(event: dict[str, Any]) -> None:
    return None


def serve(config: Config) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT or `changeover down`."""
    logfiles.setup_logging(config.state_dir, logs=config.logs)

    async def main() -> None:
        daemon = Daemon(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, daemon.sighup)
        try:
            await daemon.run()
        finally:
            # the event loop's own final cancel of what is left is one cancel and an unbounded wait
            if await cancel.leftovers(LEFTOVER_TIMEOUT):
                logging.shutdown()
                os._exit(1)   # stopped, state closed; a task that will not end must not keep the process

    uvloop.run(main())
