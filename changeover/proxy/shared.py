"""The daemon's side of a shared front (`[proxy] shared = true`): this project's routes only.

A `ProxyControl` like the proxy worker's handle, so the pipeline, switch, drain and recovery code
is the same: `ensure()` starts the front if no front answers on the control socket (one daemon at
a time, under a lock file) and attaches this project with its host names; every later call
carries the project's key (`.changeover/front.key`, 0600), which is what the front picks the
project's site by (proxy/front.py). No call names a project: a daemon can only address its own.

`shutdown()` (`changeover down`) detaches the project: its host names are free again and the
front stops once no project is attached. A daemon killed with SIGKILL leaves its routes serving;
when it comes back, `ensure()` finds its site and adopts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from changeover import rpc, sockets
from changeover.errors import ChangeoverError, ConfigError, DaemonError
from changeover.proxy import ops
from changeover.proxy.base import ProxySettings, probe_bind
from changeover.proxy.front_wire import FRONT_PROTOCOL, MOVED, start_front

log = logging.getLogger("changeover.proxy.shared")
KEY_FILE = "front.key"


def front_socket_path(settings: ProxySettings) -> Path:
    """`[proxy] front_socket`, else one per port in `sockets.runtime_dir()`: /run/changeover for root, else
    a directory of the user's."""
    if settings.front_socket:
        return Path(settings.front_socket)
    return sockets.runtime_dir() / f"front-{settings.port}.sock"


def registry_path(sock: Path) -> Path:
    return sock.with_name(sock.name + ".json")


def front_settings(settings: ProxySettings) -> ProxySettings:
    """What the front itself runs with: the listener's settings, no project's own. One process
    (host routing keeps its tables in it); HTTPS comes from the attached projects' [proxy.tls]."""
    one: dict[str, Any] = {"workers": 1} if any(f.name == "workers" for f in dataclasses.fields(ProxySettings)) else {}
    return dataclasses.replace(settings, hosts=(), shared=False, front_socket="", routes=(), tls=None, **one)


async def front_info(sock: Path) -> dict[str, Any] | None:
    """The front's public ping (pid, port, every site's hosts and live slot), None if it is down."""
    try:
        return dict(await rpc.call(sock, "ping", {}, timeout=2))
    except (DaemonError, OSError):
        return None


class SharedFront:
    def __init__(self, settings: ProxySettings, state_dir: Path, config_file: str = "") -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.config_file = config_file or str(state_dir)
        self.socket = front_socket_path(settings)
        self.pid: int | None = None
        self.port: int | None = None
        self.attached: tuple[Any, ...] | None = None    # what the front has for this site (hosts, routes)
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            path = self.state_dir / KEY_FILE
            try:
                self._key = path.read_text().strip()
            except FileNotFoundError:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                key = secrets.token_hex(32)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(key + "\n")
                self._key = key
        return self._key

    def _wanted(self) -> tuple[Any, ...]:
        s = self.settings
        return (s.hosts, s.routes, s.max_routes, s.listen, str(self.socket), s.tls)

    @property
    def settings_differ(self) -> bool:
        """This project's hosts or route patterns changed since it attached: attach again."""
        return self.attached is not None and self.attached != self._wanted()

    async def ensure(self, initial: dict[str, Any] | None = None) -> str:
        """Attach to the front (starting it if none runs); "adopted" when the front already had this
        project's site (its routing is kept), else "started" (loaded with `initial`)."""
        self.socket = front_socket_path(self.settings)
        if await front_info(self.socket) is None:
            await self._start()
        result = await self._attach(initial)
        return "adopted" if result.get("adopted") else "started"

    async def _start(self) -> None:
        """Start the front unless another daemon did meanwhile (the lock file orders them)."""
        parent = self.socket.parent
        if not parent.exists():
            sockets.own_dir(parent, 0o755 if os.geteuid() == 0 else 0o700)
        lock_path = self.socket.with_name(self.socket.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
            if await front_info(self.socket) is not None:
                return
            self._check_port_free()
            pid = await start_front(self.socket, registry_path(self.socket), front_settings(self.settings))
            log.info("shared front started (pid %d) on %s, control socket %s", pid, self.settings.listen, self.socket)
        finally:
            os.close(fd)

    def _check_port_free(self) -> None:
        """The front binds with SO_REUSEPORT, which would silently share the port with another such
        process (a project's own proxy): nobody may listen there when a front starts."""
        host, port = self.settings.host, self.settings.port
        if port == 0:
            return
        try:
            probe_bind(host, port)
        except OSError as e:
            raise ConfigError(f"cannot start the shared front on {self.settings.listen}: {e.strerror or e} "
                              "(another process, not a changeover front, uses it)", key="proxy.listen") from None

    async def _attach(self, initial: dict[str, Any] | None) -> dict[str, Any]:
        s = self.settings
        result = dict(await self._call("attach", project=str(self.state_dir.absolute()), config=self.config_file,
                                       hosts=list(s.hosts), routes=list(s.routes), max_routes=s.max_routes,
                                       initial=initial, tls=dataclasses.asdict(s.tls) if s.tls else None))
        self.pid, self.port = int(result["pid"]), int(result["port"])
        self.attached = self._wanted()
        theirs = result.get("settings") or {}
        ours = json.loads(json.dumps(dataclasses.asdict(front_settings(s))))
        differ = sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
        if differ:
            log.warning("the shared front runs with the [proxy] settings of the project that started it; this "
                        "project's differ in %s (host routing is unaffected)", ", ".join(differ))
        log.info("attached to the shared front (pid %s) for %s (%s)", self.pid, ", ".join(s.hosts),
                 "adopted" if result.get("adopted") else "new")
        return result

    async def ping(self) -> dict[str, Any] | None:
        try:
            info = dict(await rpc.call(self.socket, "ping", {"key": self.key}, timeout=2))
        except (DaemonError, OSError):
            return None
        except ChangeoverError as e:
            if str(e).startswith("refused: this key opens no project"):
                return None            # a front that lost this site (started anew): attach again
            raise
        if info.get("protocol") != FRONT_PROTOCOL:
            raise ChangeoverError(f"the shared front on {self.socket} speaks front protocol {info.get('protocol')}"
                                  f" and this changeover {FRONT_PROTOCOL}: hand it over (`changeover front "
                                  "handover`) with the changeover of the same version")
        self.pid, self.port = int(info["pid"]), int(info["port"])
        site = info.get("site") or {}
        return {"pid": self.pid, "port": self.port, "live": info.get("live"), "protocol": ops.PROTOCOL,
                "settings": dataclasses.asdict(self.settings), "routing": site.get("routing"),
                "drill": site.get("drill"), "health": site.get("health"), "hosts": site.get("hosts"),
                "shared": True, "front_socket": str(self.socket)}

    async def live(self) -> str | None:
        info = await self.ping()
        return None if info is None else info.get("live")

    async def _call(self, op: str, *, wait: float | None = 10, **args: Any) -> Any:
        for attempt in range(3):
            try:
                return await rpc.call(self.socket, op, {"key": self.key, **args}, timeout=wait)
            except DaemonError as e:
                if attempt == 2 or "not running" not in str(e):
                    raise ChangeoverError(f"the shared front did not answer ({op}): {e}") from None
            except ChangeoverError as e:
                if attempt == 2 or str(e) != MOVED:
                    raise
            await asyncio.sleep(0.05)      # a handover of the front is renaming its socket
        raise AssertionError("unreachable")

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        await self._call("set_slot", slot=slot, upstreams=[list(u) for u in upstreams])

    async def remove_slot(self, slot: str) -> None:
        await self._call("remove_slot", slot=slot)

    async def set_version(self, slot: str, version: str | None) -> None:
        await self._call("set_version", slot=slot, version=version)

    async def switch(self, slot: str | None) -> dict[str, Any]:
        return dict(await self._call("switch", slot=slot))

    async def drain(self, slot: str, timeout: float) -> bool:
        return bool(await self._call("drain", wait=timeout + 10, slot=slot, timeout=timeout))

    async def metrics(self, since: Any = None) -> dict[str, Any]:
        return dict(await self._call("metrics", wait=5, since=since))

    async def set_route(self, route: str, slot: str | None, token: str | None = None,
                        fault: dict[str, float] | None = None) -> None:
        await self._call("set_route", route=route, slot=slot, token=token, fault=fault)

    async def set_health(self, ok: bool, reason: str = "") -> None:
        await self._call("set_health", ok=ok, reason=reason)

    async def pause(self, timeout: float, max_held: int) -> dict[str, Any]:
        """This project's requests are held (the other projects' flow); see proxy/hold.py."""
        return dict(await self._call("pause", seconds=timeout, max_held=max_held))

    async def resume(self) -> int:
        return int((await self._call("resume"))["released"])

    async def maintenance(self, on: bool, page: bytes | None = None, retry_after: int = 30) -> dict[str, Any]:
        text = page.decode() if page is not None else None
        return dict(await self._call("maintenance", on=on, page=text, retry_after=retry_after))

    async def mode(self) -> dict[str, Any] | None:
        return dict(await self._call("mode", wait=5))

    async def handover(self, initial: dict[str, Any],
                       configure: Callable[[Any], Awaitable[None]]) -> None:
        """New [proxy] settings for this project: attach again (new host names, route patterns; on a
        new listen address or front_socket, to that front) and give the front the routing. The front
        process itself is shared and is not replaced here (`changeover front handover` does that,
        for every project at once)."""
        old = self.socket
        self.socket = front_socket_path(self.settings)
        if self.socket != old:             # another port or front: attach there, then leave the old one
            if await front_info(self.socket) is None:
                await self._start()
            await self._attach(initial)
            await configure(self)
            with contextlib.suppress(ChangeoverError):
                await rpc.call(old, "detach", {"key": self.key}, timeout=10)
            return
        await self._attach(initial)
        await configure(self)

    async def front_handover(self) -> dict[str, Any]:
        """Replace the front process by a new one (an upgrade), without a failed request."""
        result = dict(await self._call("handover", wait=self.settings.drain_timeout + 30))
        self.pid = int(result["pid"])
        return result

    async def shutdown(self) -> None:
        """`changeover down`: this project's routes and host names leave the front."""
        with contextlib.suppress(ChangeoverError):
            await self._call("detach")
        self.pid = None
