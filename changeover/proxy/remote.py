"""The daemon's handle on the proxy worker process: adopt a running one or start a new one.

Every call is one short request over `.changeover/proxy.sock` (ops and result shapes in
`proxy.ops`); none of them is on the request path, so the cost (well under a millisecond on
loopback) does not matter. A switch is a single call, which is what lets a warm rollback finish
in a few milliseconds.

A worker of another protocol version (left running by an older or newer changeover) is never
sent a routing op: it is replaced by a handover through the frozen handover ops, preloaded with
the routing it reports itself, so nothing users see changes (`ensure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from changeover import rpc, sockets
from changeover.daemon.logs import private_dir, private_file
from changeover.errors import ChangeoverError, ConfigError, DaemonError
from changeover.proxy import ops
from changeover.proxy.base import ProxySettings, probe_bind

log = logging.getLogger("changeover.proxy")
START_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0          # shutdown(): how long the worker may take to exit before SIGKILL
LOG_TAIL_LINES = 20
NEXT_SOCKET = "proxy.next.sock"   # the successor worker's socket during a handover, then renamed


class ProxyProcess:
    def __init__(self, settings: ProxySettings, state_dir: Path, socket_name: str = "proxy.sock") -> None:
        self.settings = settings
        self.state_dir = state_dir
        # proxy.next.sock is renamed over proxy.sock at a handover: both decided alike
        self.socket = sockets.place(state_dir, socket_name, room_for=NEXT_SOCKET)
        self.log_path = state_dir / "logs" / "proxy.log"
        self.pid: int | None = None
        self.pids: list[int] = []   # every worker process of the group ([proxy] workers), the leader first
        self.port: int | None = None
        self.running_settings: dict[str, Any] = _wire(settings)
        self.outdated = False     # adopted a worker of an older, compatible protocol: to be replaced

    async def ensure(self, initial: dict[str, Any] | None = None) -> str:
        """Adopt the worker if one answers on the socket, else start one. Returns 'adopted' or
        'started'. A worker of another protocol version is never driven by ops it may read
        differently: it is replaced without a gap by a worker of this version, preloaded with
        `initial` or else with the routing it reports itself. A worker from before versioning
        reports none; its ops are this version's (`ops.ADOPTABLE`), so it is adopted and marked
        `settings_differ`, which makes the daemon hand over to a new worker once it knows the routing."""
        info = await self.ping()
        if info is None:
            await self._start(initial=initial)
            return "started"
        self.pid, self.port = int(info["pid"]), int(info["port"])
        self.pids = [int(p) for p in info.get("pids") or [self.pid]]
        self.running_settings = dict(info.get("settings") or {})
        theirs = ops.protocol_of(info)
        self.outdated = False
        if theirs == ops.PROTOCOL:
            return "adopted"
        routing = initial if initial is not None else info.get("routing")
        if not isinstance(routing, dict):
            if theirs in ops.ADOPTABLE:
                log.warning("the proxy worker (pid %s) speaks protocol %s, this changeover %s: adopted until it "
                            "is replaced", self.pid, theirs, ops.PROTOCOL)
                self.outdated = True
                return "adopted"
            raise DaemonError(
                f"the proxy worker on {self.settings.listen} (pid {self.pid}) speaks proxy control protocol "
                f"{theirs} and this changeover speaks {ops.PROTOCOL}, and it does not say what it routes, so it "
                f"cannot be replaced without a gap. Stop it (`kill {self.pid}`; requests still open on it are "
                "cut) and start the daemon again: it starts a worker of this version and routes it from the state")
        log.warning("the proxy worker (pid %s) speaks protocol %s, this changeover %s: handing over to a new one",
                    self.pid, theirs, ops.PROTOCOL)

        async def loaded(_: ProxyProcess) -> None:
            """The successor was preloaded with the routing: nothing more to tell it."""

        await self.handover(routing, loaded)
        return "started"

    async def ping(self) -> dict[str, Any] | None:
        try:
            result = await rpc.call(self.socket, ops.PING, timeout=2)
        except (DaemonError, OSError):
            return None
        return dict(result)

    @property
    def settings_differ(self) -> bool:
        """The adopted worker was started with other [proxy] settings than the config has now (or
        speaks an older protocol): the daemon replaces it by a handover."""
        return self.outdated or self.running_settings != _wire(self.settings)

    def _check_port_free(self) -> None:
        """A worker binds with SO_REUSEPORT (for handovers), which would silently share the port with
        another such process: make sure nobody listens there before starting one from scratch."""
        tls = self.settings.tls            # [proxy.tls]: the HTTPS listener binds the same way
        addresses = [(self.settings.listen, "proxy.listen")] + ([(tls.listen, "proxy.tls.listen")] if tls else [])
        for listen, key in addresses:
            host, port = listen.rsplit(":", 1)[0].strip("[]"), int(listen.rsplit(":", 1)[1])
            if port == 0:
                continue
            try:
                probe_bind(host, port)
            except OSError as e:
                raise ConfigError(f"cannot listen on {listen}: {e.strerror or e} "
                                  "(another process uses it)", key=key) from None

    async def handover(self, initial: dict[str, Any], configure: Callable[[ProxyProcess], Awaitable[None]]) -> None:
        """Replace the running worker without dropping a request: start a successor on the same
        address (SO_REUSEPORT), let `configure` give it the slots, then tell the old worker to
        retire (stop accepting, finish what is open, exit) and take over its control socket."""
        nxt = ProxyProcess(self.settings, self.state_dir, socket_name=NEXT_SOCKET)
        # Same address: the successor shares the port (SO_REUSEPORT). A new address must be free.
        await nxt._start(check_port=self.running_settings.get("listen") != self.settings.listen, initial=initial)
        try:
            await configure(nxt)
        except BaseException:
            await nxt.shutdown()
            raise
        # `count`: the successor's worker processes ([proxy] workers), which new connections go to
        await self._call(ops.RETIRE, timeout=self.settings.drain_timeout, count=max(1, self.settings.workers))
        os.replace(nxt.socket, self.socket)
        old = self.pid
        self.pid, self.port, self.pids = nxt.pid, nxt.port, nxt.pids
        self.running_settings = _wire(self.settings)
        self.outdated = False
        log.info("proxy handed over from pid %s to pid %s", old, self.pid)

    async def _start(self, check_port: bool = True, initial: dict[str, Any] | None = None) -> None:
        if check_port:
            self._check_port_free()
        private_file(private_dir(self.log_path.parent) / self.log_path.name)   # 0600 (daemon/logs.py)
        cmd = [sys.executable, "-m", "changeover.proxy.worker", "--socket", str(self.socket),
               "--settings", json.dumps(dataclasses.asdict(self.settings))]
        if initial is not None:
            cmd += ["--initial", json.dumps(initial)]
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        log_from = logf.tell()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                                    start_new_session=True, close_fds=True)
        finally:
            logf.close()
        msg = await rpc.ready_line(proc, START_TIMEOUT)
        if msg is None:
            raise DaemonError(f"the proxy did not start within {START_TIMEOUT}s{self._log_tail(log_from)}")
        if not msg.get("ready"):
            reason = msg.get("reason")
            if reason in ("listen", "config"):
                # only what the user can fix in [proxy] is a config error (exit 2)
                raise ConfigError(str(msg.get("error")), key=msg.get("key") or "proxy")
            detail = msg.get("error") or f"exited with status {proc.returncode}"
            raise DaemonError(f"the proxy worker could not start: {detail}{self._log_tail(log_from)}")
        self.pid, self.port = int(msg["pid"]), int(msg["port"])
        self.pids = [int(p) for p in msg.get("pids") or [self.pid]]   # the leader first (proxy/workers.py)
        # The worker is in its own session and outlives us; a daemon thread reaps it if it exits
        # while we run (an executor thread would hold up the daemon's exit until it does).
        threading.Thread(target=proc.wait, name="reap-proxy", daemon=True).start()
        log.info("proxy started (pid %d, port %d)", self.pid, self.port)

    def _log_tail(self, since: int) -> str:
        """What the worker wrote to proxy.log since it was started, last lines only."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read()[-16384:].decode("utf-8", "replace")
        except OSError:
            return f" (see {self.log_path})"
        lines = [ln for ln in text.splitlines() if ln.strip()][-LOG_TAIL_LINES:]
        if not lines:
            return f" (nothing in {self.log_path})"
        return f"; last lines of {self.log_path}:\n" + "\n".join(f"  {ln}" for ln in lines)

    async def _call(self, op: str, *, wait: float | None = 10, **args: Any) -> Any:
        try:
            return await rpc.call(self.socket, op, args, timeout=wait)
        except DaemonError as e:
            raise ChangeoverError(f"the proxy did not answer ({op}): {e}") from None

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        await self._call(ops.SET_SLOT, slot=slot, upstreams=[list(u) for u in upstreams])

    async def remove_slot(self, slot: str) -> None:
        await self._call(ops.REMOVE_SLOT, slot=slot)

    async def switch(self, slot: str | None) -> dict[str, Any]:
        return dict(await self._call(ops.SWITCH, slot=slot))

    async def live(self) -> str | None:
        info = await self.ping()
        return None if info is None else info.get("live")

    async def drain(self, slot: str, timeout: float) -> bool:
        return bool(await self._call(ops.DRAIN, wait=timeout + 10, slot=slot, timeout=timeout))

    async def drain_requests(self, slot: str, timeout: float) -> dict[str, Any]:
        return dict(await self._call(ops.DRAIN_REQUESTS, wait=timeout + 10, slot=slot, timeout=timeout))

    async def set_version(self, slot: str, version: str | None) -> None:
        await self._call(ops.SET_VERSION, slot=slot, version=version)

    async def set_route(self, route: str, slot: str | None, token: str | None = None,
                        fault: dict[str, float] | None = None) -> None:
        await self._call(ops.SET_ROUTE, route=route, slot=slot, token=token, fault=fault)

    async def set_health(self, ok: bool, reason: str = "") -> None:
        await self._call(ops.SET_HEALTH, ok=ok, reason=reason)

    async def metrics(self, since: Any = None) -> dict[str, Any]:
        return dict(await self._call(ops.METRICS, wait=5, since=since))

    async def pause(self, timeout: float, max_held: int) -> dict[str, Any]:
        return dict(await self._call(ops.PAUSE, seconds=timeout, max_held=max_held))

    async def resume(self) -> int:
        return int((await self._call(ops.RESUME))["released"])

    async def maintenance(self, on: bool, page: bytes | None = None, retry_after: int = 30) -> dict[str, Any]:
        text = page.decode() if page is not None else None
        return dict(await self._call(ops.MAINTENANCE, on=on, page=text, retry_after=retry_after))

    async def mode(self) -> dict[str, Any] | None:
        return dict(await self._call(ops.MODE, wait=5))

    async def shutdown(self) -> None:
        """Stop the worker (used by `changeover down`) and return once it has exited, its control
        socket gone with it."""
        pid = self.pid
        try:
            await self._call(ops.SHUTDOWN, wait=5)
        except ChangeoverError:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        if pid:
            deadline = time.monotonic() + EXIT_TIMEOUT
            while _running(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if _running(pid):
                log.warning("the proxy worker (pid %d) did not exit within %.0fs: killing it", pid, EXIT_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # a worker that died before it could clean up leaves its socket: nobody answers there now
        if self.socket.exists() and await self.ping() is None:
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
        self.pid = None


def _wire(settings: ProxySettings) -> dict[str, Any]:
    """Settings as a worker reports them back (through JSON: tuples come back as lists)."""
    return dict(json.loads(json.dumps(dataclasses.asdict(settings))))


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
