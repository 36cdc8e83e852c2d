"""An in-memory `DataPlane` for other layers' unit tests: no sockets, every call recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from changeover.errors import ChangeoverError


class FakeDataPlane:
    """Behaves like the embedded proxy towards the daemon, and remembers what it was told.

    `switches` lists every `switch()` target in order; `drains` every (slot, timeout, result).
    Tests simulate traffic with `begin(slot)` / `end(slot)`, which move the in-flight count that
    `drain()` waits for; `drain_result` forces the outcome of the next drains when set.
    """

    def __init__(self) -> None:
        self.started = False
        self.closed = False
        self.slots: dict[str, list[tuple[str, int]]] = {}
        self.switches: list[str | None] = []
        self.drains: list[tuple[str, float, bool]] = []
        self.drain_result: bool | None = None
        self._live: str | None = None
        self._inflight: dict[str, int] = {}
        self._idle = asyncio.Event()

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        if not slot:
            raise ChangeoverError("slot name must be a non-empty string")
        self.slots[slot] = [(h, int(p)) for h, p in upstreams]

    def remove_slot(self, slot: str) -> None:
        if slot == self._live:
            raise ChangeoverError(f"slot {slot} is live; switch away from it before removing it")
        self.slots.pop(slot, None)

    def switch(self, slot: str | None) -> None:
        if slot is not None and slot not in self.slots:
            raise ChangeoverError(f"unknown slot {slot!r}")
        self._live = slot
        self.switches.append(slot)

    @property
    def live(self) -> str | None:
        return self._live

    def inflight(self, slot: str) -> int:
        return self._inflight.get(slot, 0)

    def begin(self, slot: str) -> None:
        self._inflight[slot] = self._inflight.get(slot, 0) + 1

    def end(self, slot: str) -> None:
        self._inflight[slot] = max(0, self._inflight.get(slot, 0) - 1)

    async def drain(self, slot: str, timeout: float) -> bool:
        if self.drain_result is not None:
            result = self.drain_result
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while self.inflight(slot) and loop.time() < deadline:
                await asyncio.sleep(min(0.01, max(0.0, deadline - loop.time())))
            result = not self.inflight(slot)
            self._inflight[slot] = 0          # what was left is cut, as the real proxies do
        self.drains.append((slot, timeout, result))
        return result
