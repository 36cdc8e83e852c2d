"""An in-memory `ProxyControl` for in-process tests of the pipeline and recovery: no sockets,
every call recorded, traffic simulated on demand.

It behaves like the embedded proxy towards the daemon (kamal-proxy tests its router the same
way): `switches` lists every `switch()` target in order, `drains` every (slot, timeout, result).
`request(slot, status, seconds)` records a simulated request for the monitor; `begin(slot)` /
`end(slot)` move the in-flight count that `drain()` waits for. `fail_next(op)` makes the next
call of that op raise, to test what a data-plane failure does to a deploy. `routes` holds the
private routes (`set_route`: the drill's), `health` what the health check would answer,
`paused_until` and `maintenance_page` the pause and the maintenance mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from changeover.errors import ChangeoverError
from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from changeover.proxy.base import ProxySettings
from changeover.proxy.control import PROXY_PROTOCOL


class FakeControl:
    def __init__(self, settings: ProxySettings | None = None, *, running: bool = False) -> None:
        self.settings = settings or ProxySettings()
        self.pid: int | None = None
        self.port: int | None = None
        self.running = running            # True: ensure() adopts (a data plane that kept running)
        self.slots: dict[str, list[tuple[str, int]]] = {}
        self.versions: dict[str, str | None] = {}
        self.switches: list[str | None] = []
        self.drains: list[tuple[str, float, bool]] = []
        self.calls: list[str] = []
        self.recorder = Recorder()
        self._live: str | None = None
        self._inflight: dict[str, int] = {}
        self._fail: dict[str, str] = {}
        self._running_settings = dataclasses.asdict(self.settings)
        self.routes: dict[str, dict[str, Any]] = {}     # route -> {"slot", "token", "fault"}
        self.health: tuple[bool, str] = (True, "")
        # pause and maintenance, as proxy.hold.Gate.mode() reports them
        self.paused_until: float | None = None
        self.max_held = 0
        self.maintenance_page: bytes | None = None   # set while maintenance is on
        self.retry_after = 0

    # -- test controls ------------------------------------------------------------------------
    def fail_next(self, op: str, message: str = "the proxy did not answer") -> None:
        self._fail[op] = message

    def request(self, slot: str, status: int = 200, seconds: float = 0.001) -> None:
        self.recorder.record(slot, status, seconds, status >= 502)

    def begin(self, slot: str) -> None:
        self._inflight[slot] = self._inflight.get(slot, 0) + 1

    def end(self, slot: str) -> None:
        self._inflight[slot] = max(0, self._inflight.get(slot, 0) - 1)

    def _call(self, op: str) -> None:
        self.calls.append(op)
        msg = self._fail.pop(op, None)
        if msg is not None:
            raise ChangeoverError(f"{msg} ({op})")

    # -- ProxyControl -------------------------------------------------------------------------
    async def ensure(self, initial: dict[str, Any] | None = None) -> str:
        self._call("ensure")
        if self.running:
            return "adopted"
        self.running, self.pid, self.port = True, 1, self.settings.port
        if initial:
            for slot, ups in initial.get("slots", {}).items():
                self.slots[slot] = [(h, int(p)) for h, p in ups]
            self.versions.update(initial.get("versions", {}))
            self._live = initial.get("live")
        self._running_settings = dataclasses.asdict(self.settings)
        return "started"

    async def ping(self) -> dict[str, Any] | None:
        if not self.running:
            return None
        return {"pid": self.pid, "port": self.port, "live": self._live, "settings": self._running_settings,
                "protocol": PROXY_PROTOCOL}

    @property
    def settings_differ(self) -> bool:
        return self._running_settings != dataclasses.asdict(self.settings)

    async def live(self) -> str | None:
        return self._live if self.running else None

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        self._call("set_slot")
        self.slots[slot] = [(h, int(p)) for h, p in upstreams]

    async def set_version(self, slot: str, version: str | None) -> None:
        self.versions[slot] = version
        self.recorder.set_version(slot, version)

    async def remove_slot(self, slot: str) -> None:
        self._call("remove_slot")
        if slot == self._live:
            raise ChangeoverError(f"slot {slot} is live; switch away from it before removing it")
        self.slots.pop(slot, None)
        self.routes = {r: v for r, v in self.routes.items() if v["slot"] != slot}

    async def set_route(self, route: str, slot: str | None, token: str | None = None,
                        fault: dict[str, float] | None = None) -> None:
        self._call("set_route")
        if route != "drill":
            raise ChangeoverError(f"unknown route {route!r} (known: drill)")
        if slot is None:
            self.routes.pop(route, None)
            return
        if slot not in self.slots:
            raise ChangeoverError(f"unknown slot {slot!r}")
        self.routes[route] = {"slot": slot, "token": token, "fault": dict(fault or {})}

    def route_request(self, token: str | None, status: int = 200, seconds: float = 0.001) -> str | None:
        """A simulated request through the data plane, as the embedded proxy routes it: with the
        drill's token to the drill slot (its fault applied), else to the live slot. Returns the slot."""
        drill = self.routes.get("drill")
        if drill is not None and token is not None and token == drill["token"]:
            fault = drill["fault"]
            status = int(fault.get("status") or status)
            self.request(drill["slot"], status, seconds + float(fault.get("delay", 0.0)))
            return str(drill["slot"])
        if self._live is not None:
            self.request(self._live, status, seconds)
        return self._live

    async def set_health(self, ok: bool, reason: str = "") -> None:
        self._call("set_health")
        self.health = (bool(ok), reason)

    async def switch(self, slot: str | None) -> dict[str, Any]:
        self._call("switch")
        if slot is not None and slot not in self.slots:
            raise ChangeoverError(f"unknown slot {slot!r}")
        was, self._live = self._live, slot
        self.switches.append(slot)
        return {"live": slot, "was": was}

    async def drain(self, slot: str, timeout: float) -> bool:
        self._call("drain")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._inflight.get(slot) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        result = not self._inflight.get(slot)
        self._inflight[slot] = 0          # what was left is cut, as the real proxies do
        self.drains.append((slot, timeout, result))
        return result

    async def metrics(self, since: Any = None) -> dict[str, Any]:
        return mirror.export(self.recorder, since)

    async def pause(self, timeout: float, max_held: int) -> dict[str, Any]:
        self._call("pause")
        self.paused_until, self.max_held = time.time() + timeout, max_held
        return await self.mode()

    async def resume(self) -> int:
        self._call("resume")
        self.paused_until = None
        return 0

    async def maintenance(self, on: bool, page: bytes | None = None, retry_after: int = 30) -> dict[str, Any]:
        self._call("maintenance")
        self.maintenance_page = (page or b"maintenance") if on else None
        self.retry_after = retry_after if on else 0
        return await self.mode()

    async def mode(self) -> dict[str, Any]:
        if self.paused_until is not None and time.time() >= self.paused_until:
            self.paused_until = None       # the pause timeout: it resumes by itself, as the proxies do
        on = self.maintenance_page is not None
        return {"paused": self.paused_until is not None, "until": self.paused_until, "held": 0,
                "max_held": self.max_held, "maintenance": on, "retry_after": self.retry_after if on else None,
                "page_bytes": len(self.maintenance_page or b"")}

    async def handover(self, initial: dict[str, Any], configure: Callable[[Any], Awaitable[None]]) -> None:
        self._call("handover")
        self._running_settings = dataclasses.asdict(self.settings)
        await configure(self)

    async def shutdown(self) -> None:
        self._call("shutdown")
        self.running = False
