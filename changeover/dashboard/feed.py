"""What the pages show, read once a second through the control API and shared by every browser.

One poller for all viewers: status, history and releases while someone is watching; the
per-second traffic series always (a few seconds at a time, cheap), kept here for the Traffic
page's 10 minutes even across a release change that cleared the daemon's own ring. Each new
reading bumps `version`; the event streams wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from changeover.dashboard.actions import Runner
from changeover.dashboard.client import Client
from changeover.errors import ChangeoverError

log = logging.getLogger("changeover.dashboard")
TICK = 1.0
SPAN = 600              # seconds of traffic the Traffic page shows
TAIL = 5                # seconds re-read each tick (the newest is still filling)
RELEASES_EVERY = 5.0


class Feed:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.runner = Runner(client, self.bump)
        self.status: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.releases: list[dict[str, Any]] = []
        self.error: str | None = None        # the daemon did not answer: said on every page
        self.points: dict[str, dict[int, list[Any]]] = {}
        self.versions: dict[str, str] = {}
        self.switches: dict[float, dict[str, Any]] = {}
        self.offset = time.time() - time.monotonic()
        self.version = 0
        self.watchers = 0
        self.closing = False                 # the daemon is stopping: streams end
        self._changed = asyncio.Event()
        self._seeded = False
        self._releases_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dashboard-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.runner.close()

    def bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen: int, timeout: float) -> int:
        """Until the feed has something newer than `seen` (or timeout): the current version."""
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        return self.version

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("the dashboard's reading of the daemon failed")
            await asyncio.sleep(TICK)

    async def refresh(self, full: bool | None = None) -> None:
        try:
            await self._read_series(SPAN if not self._seeded else TAIL)
            self._seeded = True
            want = self.watchers > 0 if full is None else full
            if want:
                self.status = await self.client.status()
                self.history = await self.client.history(20)
                if time.monotonic() - self._releases_at > RELEASES_EVERY or full:
                    self.releases = await self.client.releases()
                    self._releases_at = time.monotonic()
            self.error = None
        except ChangeoverError as e:
            self.error = str(e)
        self.bump()

    async def _read_series(self, seconds: int) -> None:
        data = await self.client.series(seconds)
        self.offset = float(data["offset"])
        horizon = int(data["now"]) - SPAN
        for slot, s in data["slots"].items():
            pts = self.points.setdefault(slot, {})
            for p in s["points"]:
                pts[int(p[0])] = p
            for t in [t for t in pts if t <= horizon]:
                del pts[t]
            self.versions[slot] = s["version"]
        for sw in data["switches"]:
            self.switches[sw["ts"]] = sw
        for ts in [ts for ts in self.switches if ts < time.time() - SPAN]:
            del self.switches[ts]

    def traffic(self) -> dict[str, Any]:
        """The Traffic page's data: per slot, columns over wall-clock seconds (uPlot's shape)."""
        out: dict[str, Any] = {}
        for slot, pts in sorted(self.points.items()):
            ts = sorted(pts)
            rows = [pts[t] for t in ts]
            out[slot] = {"version": self.versions.get(slot, ""),
                         "t": [round(t + self.offset, 3) for t in ts],
                         "rps": [r[1] for r in rows],
                         "error_rate": [round(100 * r[2] / r[1], 3) if r[1] else 0 for r in rows],
                         "p50": [r[3] for r in rows], "p95": [r[4] for r in rows], "p99": [r[5] for r in rows]}
        return {"slots": out, "switches": sorted(self.switches.values(), key=lambda s: s["ts"])}
