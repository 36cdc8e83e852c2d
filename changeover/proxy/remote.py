"""The daemon's handle on the proxy worker process: adopt a running one or start a new one.

Every call is one short request over `.changeover/proxy.sock`; none of them is on the request
path, so the cost (well under a millisecond on loopback) does not matter. A switch is a single
call, which is what lets a warm rollback finish in a few milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from changeover import rpc
from changeover.errors import ChangeoverError, ConfigError, DaemonError
from changeover.proxy.base import ProxySettings

log = logging.getLogger("changeover.proxy")
START_TIMEOUT = 10.0


class ProxyProcess:
    def __init__(self, settings: ProxySettings, state_dir: Path, socket_name: str = "proxy.sock") -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.socket = state_dir / socket_name
        self.log_path = state_dir / "logs" / "proxy.log"
        self.pid: int | None = None
        self.port: int | None = None
        self.running_settings: dict[str, Any] = dataclasses.asdict(settings)

    async def ensure(self, initial: dict[str, Any] | None = None) -> str:
        """Adopt the worker if one answers on the socket, else start one. Returns 'adopted' or 'started'."""
        info = await self.ping()
        if info is not None:
            self.pid, self.port = int(info["pid"]), int(info["port"])
            self.running_settings = dict(info["settings"])
            return "adopted"
        await self._start(initial=initial)
        return "started"

    async def ping(self) -> dict[str, Any] | None:
        try:
            result = await rpc.call(self.socket, "ping", timeout=2)
        except (DaemonError, OSError):
            return None
        return dict(result)

    @property
    def settings_differ(self) -> bool:
        """The adopted worker was started with other [proxy] settings than the config has now."""
        return self.running_settings != dataclasses.asdict(self.settings)

    def _check_port_free(self) -> None:
        """A worker binds with SO_REUSEPORT (for handovers), which would silently share the port with
        another such process: make sure nobody listens there before starting one from scratch."""
        host, port = self.settings.host, self.settings.port
        if port == 0:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise ConfigError(f"cannot listen on {self.settings.listen}: {e.strerror or e} "
                                  "(another process uses it)", key="proxy.listen") from None

    async def handover(self, initial: dict[str, Any], configure: Callable[[ProxyProcess], Awaitable[None]]) -> None:
        """Replace the running worker without dropping a request: start a successor on the same
        address (SO_REUSEPORT), let `configure` give it the slots, then tell the old worker to
        retire (stop accepting, finish what is open, exit) and take over its control socket."""
        nxt = ProxyProcess(self.settings, self.state_dir, socket_name="proxy.next.sock")
        # Same address: the successor shares the port (SO_REUSEPORT). A new address must be free.
        await nxt._start(check_port=self.running_settings.get("listen") != self.settings.listen, initial=initial)
        try:
            await configure(nxt)
        except BaseException:
            await nxt.shutdown()
            raise
        await self._call("retire", timeout=self.settings.drain_timeout)
        os.replace(nxt.socket, self.socket)
        old = self.pid
        self.pid, self.port = nxt.pid, nxt.port
        self.running_settings = dataclasses.asdict(self.settings)
        log.info("proxy handed over from pid %s to pid %s", old, self.pid)

    async def _start(self, check_port: bool = True, initial: dict[str, Any] | None = None) -> None:
        if check_port:
            self._check_port_free()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "changeover.proxy.worker", "--socket", str(self.socket),
               "--settings", json.dumps(dataclasses.asdict(self.settings))]
        if initial is not None:
            cmd += ["--initial", json.dumps(initial)]
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                                    start_new_session=True, close_fds=True)
        finally:
            logf.close()
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise DaemonError(f"the proxy did not start within {START_TIMEOUT}s (see {self.log_path})") from None
        finally:
            proc.stdout.close()
        try:
            msg = json.loads(line or b"{}")
        except ValueError:
            msg = {}
        if not msg.get("ready"):
            proc.wait()
            detail = msg.get("error") or f"exited with {proc.returncode} (see {self.log_path})"
            raise ConfigError(detail, key="proxy.listen")
        self.pid, self.port = int(msg["pid"]), int(msg["port"])
        # The worker is in its own session and outlives us; a daemon thread reaps it if it exits
        # while we run (an executor thread would hold up the daemon's exit until it does).
        threading.Thread(target=proc.wait, name="reap-proxy", daemon=True).start()
        log.info("proxy started (pid %d, port %d)", self.pid, self.port)

    async def _call(self, op: str, *, wait: float | None = 10, **args: Any) -> Any:
        try:
            return await rpc.call(self.socket, op, args, timeout=wait)
        except DaemonError as e:
            raise ChangeoverError(f"the proxy did not answer ({op}): {e}") from None

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        await self._call("set_slot", slot=slot, upstreams=[list(u) for u in upstreams])

    async def remove_slot(self, slot: str) -> None:
        await self._call("remove_slot", slot=slot)

    async def switch(self, slot: str | None) -> dict[str, Any]:
        return dict(await self._call("switch", slot=slot))

    async def live(self) -> str | None:
        info = await self.ping()
        return None if info is None else info.get("live")

    async def inflight(self, slot: str) -> int:
        return int(await self._call("inflight", slot=slot))

    async def drain(self, slot: str, timeout: float) -> bool:
        return bool(await self._call("drain", wait=timeout + 10, slot=slot, timeout=timeout))

    async def set_version(self, slot: str, version: str | None) -> None:
        await self._call("set_version", slot=slot, version=version)

    async def metrics(self, since: Any = None) -> dict[str, Any]:
        return dict(await self._call("metrics", wait=5, since=since))

    async def shutdown(self) -> None:
        """Stop the worker (used by `changeover down`)."""
        pid = self.pid
        try:
            await self._call("shutdown", wait=5)
        except ChangeoverError:
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
