"""App processes of a retired slot kept running only for the tunnels they still serve.

A slot being retired (the standby making room for a deploy, a standby past `keep_standby`) may
hold nothing but tunnels: WebSockets can stay open for hours. The deploy does not wait for them.
The proxy keeps those tunnels open until the drain limit (`drain_timeout` from the start of the
drain) and then closes them with a WebSocket close frame 1001 (going away), so clients reconnect,
to the new release once it is live; meanwhile the slot is free for the next release and its old
processes, no longer supervised, serve the tunnels. Shortly after the limit they are stopped here.

The processes are written to the state (timer `tunnel_linger`) before the slot forgets them, so a
daemon killed in between, or restarted during the grace, still stops them when it is due.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from changeover.daemon import procs
from changeover.daemon.instances import InstanceRecord
from changeover.state import State

log = logging.getLogger("changeover.linger")

TIMER = "tunnel_linger"
# after the drain limit: the proxy's wait for a frame in flight (proxy.exchange.WS_CUT_WAIT) and
# the close handshake with the app
AFTER_LIMIT = 2.0
STOP_TIMEOUT = 5.0


class Lingering:
    """The groups of processes kept for tunnels: {slot, version, due, records} in the state."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._procs: dict[int, procs.Proc] = {}      # pid -> the supervisor's Proc (our child)
        self._task: asyncio.Task[None] | None = None

    def groups(self) -> list[dict[str, Any]]:
        t = self.state.timer(TIMER)
        return list(t[1].get("groups", [])) if t else []

    def pids(self) -> set[int]:
        """Process groups kept for tunnels (recovery must not take them for orphans)."""
        return {int(r["pid"]) for g in self.groups() for r in g.get("records", []) if "pid" in r}

    def hold(self, slot: str, version: str | None, limit_in: float, records: list[InstanceRecord],
             running: list[procs.Proc], tunnels: int) -> float:
        """Keep `records` running until the drain limit (`limit_in` seconds from now) and a little
        after; returns when they will be stopped (epoch seconds)."""
        due = time.time() + limit_in + AFTER_LIMIT
        groups = [*self.groups(), {"slot": slot, "version": version, "due": due, "tunnels": tunnels,
                                   "records": [r.to_json() for r in records]}]
        self._write(groups)
        for p in running:
            self._procs[p.pid] = p
        self.arm()
        return due

    def arm(self) -> None:
        """(Re)start the task that stops each group when it is due (called at daemon start too)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.groups():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tunnel-linger")

    async def close(self) -> None:
        """The daemon stops: the processes keep running, the state says when to stop them."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def stop_due(self, now: float | None = None) -> int:
        """Stop every group that is due; returns how many groups were stopped."""
        now = time.time() if now is None else now
        due = [g for g in self.groups() if float(g.get("due", 0)) <= now]
        for g in due:
            await self._stop(g)
        return len(due)

    async def _run(self) -> None:
        while True:
            groups = self.groups()
            if not groups:
                return
            wait = min(float(g.get("due", 0)) for g in groups) - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.stop_due()
            except Exception:              # never leave the loop on one bad group: retried later
                log.exception("stopping the processes kept for tunnels failed")
                await asyncio.sleep(1.0)

    async def _stop(self, group: dict[str, Any]) -> None:
        slot = str(group.get("slot"))
        outcomes = []
        for data in group.get("records", []):
            try:
                rec = InstanceRecord.from_json(data)
            except (KeyError, TypeError, ValueError):
                continue
            proc = self._procs.pop(rec.pid, None)
            if proc is None:
                if procs.proc_start(rec.pid) != rec.proc_start:
                    continue               # gone already (or the pid is someone else's now)
                proc = procs.Proc(rec.pid, rec.proc_start)
            outcomes.append(f"pid {rec.pid} {await procs.terminate(proc, STOP_TIMEOUT)}")
        log.info("slot=%s release %s: the processes kept for tunnels after the drain limit are stopped (%s)",
                 slot, group.get("version"), "; ".join(outcomes) or "none was running")
        self.state.event("drain.tunnels_stopped", slot, version=group.get("version"),
                         detail="; ".join(outcomes) or "none was running")
        self._write([g for g in self.groups() if g != group])   # last: until then it is retried

    def _write(self, groups: list[dict[str, Any]]) -> None:
        if groups:
            self.state.set_timer(TIMER, min(float(g["due"]) for g in groups), groups=groups)
        else:
            self.state.clear_timer(TIMER)
