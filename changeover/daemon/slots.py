"""Slot operations: start a release in a slot, switch the live slot, retire a slot.

Every state transition of a slot happens in `SlotManager.transition`, which logs `state=` and
`was=` and writes the new state before the action that follows it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from changeover.config import AppConfig, Config, require_app
from changeover.daemon.instances import InstanceRecord, ReleaseSpec, SupervisorEvent
from changeover.daemon.linger import Lingering
from changeover.daemon.model import SlotState, other
from changeover.daemon.supervisor import Supervisor
from changeover.errors import DeployError
from changeover.proxy.control import ProxyControl, TunnelDrainControl
from changeover.state import SLOTS, State
from changeover.state_schema import Release

log = logging.getLogger("changeover.slots")
__all__ = ["SlotManager", "other", "spec_of"]


def app_of(app: AppConfig, release: Release) -> AppConfig:
    """The [app] settings a release runs with: those recorded when it was deployed (health path,
    instances, timeouts), so a rollback restores them with its code and env."""
    known = {f.name for f in dataclasses.fields(AppConfig)}
    recorded = {k: v for k, v in release.config.items() if k in known and k != "command"}
    return dataclasses.replace(app, **recorded) if recorded else app


def spec_of(release: Release) -> ReleaseSpec:
    return ReleaseSpec(version=release.version, path=Path(release.path), command=tuple(release.command),
                       env=dict(release.env))


class SlotManager:
    def __init__(self, config: Config, state: State, proxy: ProxyControl) -> None:
        self.config = config
        self.state = state
        self.proxy = proxy
        self.supervisor = Supervisor(require_app(config), config.state_dir / "logs", on_event=self._on_event)
        self.crashes: list[tuple[float, str]] = []  # (time, slot): read by the monitor's crash-loop trigger
        self._pending: list[SupervisorEvent] = []
        self.linger = Lingering(state)     # processes of retired slots kept for their tunnels

    # -- transitions ------------------------------------------------------------------------------
    def transition(self, slot: str, new: SlotState, *, release_id: int | None = -1,
                   instances: list[dict[str, Any]] | None = None, why: str = "") -> None:
        self.state.transition_slot(slot, new, release_id=release_id, instances=instances, why=why)

    def version(self, slot: str | None) -> str | None:
        if slot is None:
            return None
        rel = self.state.release(self.state.slot(slot).release_id)
        return rel.version if rel else None

    def warm(self, slot: str) -> bool:
        return bool(self.supervisor.upstreams(slot))

    # -- actions ----------------------------------------------------------------------------------
    async def start(self, slot: str, release: Release) -> list[InstanceRecord]:
        """Start `release` in an empty slot and wait until ready; the proxy learns its upstreams."""
        self.supervisor.app = app_of(require_app(self.config), release)
        self.transition(slot, SlotState.STARTING, release_id=release.id, instances=[],
                        why=f"starting {release.version}")
        records = await self.supervisor.start_slot(slot, spec_of(release))
        self.state.set_instances(slot, [r.to_json() for r in records])
        await self.proxy.set_slot(slot, self.supervisor.upstreams(slot))
        await self.proxy.set_version(slot, release.version)
        return records

    async def switch(self, slot: str, why: str = "switch") -> float:
        """Make `slot` live; the previous live slot becomes the warm standby. Returns seconds taken."""
        if not self.warm(slot):
            raise DeployError(f"slot {slot} has no running instance to switch to")
        t0 = time.perf_counter()
        await self.proxy.set_slot(slot, self.supervisor.upstreams(slot))
        await self.proxy.switch(slot)
        elapsed = time.perf_counter() - t0
        was = self.state.live_slot()
        self.state.swap_live(slot, why)
        log.info("live slot=%s was=%s switched in %.1f ms", slot, was, elapsed * 1000)
        self.state.event("switch", slot, was=was, ms=round(elapsed * 1000, 2), version=self.version(slot))
        return elapsed

    async def retire(self, slot: str, *, drain: bool = True, why: str = "") -> str | None:
        """Stop routing to a slot, drain it, stop its processes, forget it. Tunnels (WebSockets)
        do not hold the drain up: when only they are left, the slot is free at once, its processes
        serve them until the drain limit (daemon/linger.py) and the returned text says so."""
        current = self.state.slot(slot)
        if current.state == SlotState.EMPTY and not self.supervisor.records(slot):
            return None
        if self.state.live_slot() == slot:
            raise DeployError(f"slot {slot} is live; switch away from it first")
        if current.state != SlotState.STOPPING:
            self.transition(slot, SlotState.STOPPING, why=why)
        held: dict[str, Any] = {}
        if drain and isinstance(self.proxy, TunnelDrainControl):
            held = await self.proxy.drain_requests(slot, self.config.proxy.drain_timeout)
        elif drain:
            await self.proxy.drain(slot, self.config.proxy.drain_timeout)
        note = None
        if held.get("tunnels"):
            version = self.version(slot)
            records, running = await self.supervisor.release_slot(slot)
            n, ws, left = int(held["tunnels"]), int(held.get("websockets", 0)), float(held.get("limit_in", 0))
            self.linger.hold(slot, version, left, records, running, n)
            # from now on the timer owns them: a recovery of this half-retired slot must not kill them
            self.state.set_instances(slot, [])
            what = f"{n} WebSocket tunnel{'s' if n != 1 else ''}" if ws == n else \
                f"{n} tunnel{'s' if n != 1 else ''}" + (f" ({ws} WebSocket)" if ws >= 0 else "")
            label = current.state if current.state in (SlotState.STANDBY, SlotState.LIVE) else "slot"
            end = f"they get 1001 at the drain limit in {left:.0f} s" if held.get("close_frame", True) else \
                f"they are closed at the drain limit in {left:.0f} s (HAProxy sends no close frame)"
            note = f"{label} {slot} holds {what} only: not waiting; {end}"
            log.info("slot=%s %s", slot, note)
            self.state.event("drain.tunnels", slot, version=version, tunnels=n, websockets=ws,
                             limit_in=round(left, 1), detail=note)
        await self.proxy.remove_slot(slot)
        await self.supervisor.stop_slot(slot)
        self.transition(slot, SlotState.EMPTY, release_id=None, instances=[], why=why)
        return note

    async def drain_for_down(self, slot: str) -> None:
        """`changeover down`: let the slot's requests finish (up to drain_timeout), then end what is
        left. A WebSocket can stay open for hours and the site is going away: tunnels do not hold
        `down` up, each gets its close frame (1001, going away) now, before its app stops."""
        timeout = self.config.proxy.drain_timeout
        if not isinstance(self.proxy, TunnelDrainControl):
            await self.proxy.drain(slot, timeout)
            return
        held = await self.proxy.drain_requests(slot, timeout)
        if held.get("tunnels"):
            log.info("slot=%s down: closing %s tunnel(s) now instead of waiting for them", slot, held["tunnels"])
            await self.proxy.drain(slot, 0.0)

    # -- supervisor events --------------------------------------------------------------------------
    def _on_event(self, ev: SupervisorEvent) -> None:
        detail: dict[str, Any] = {"detail": ev.detail}
        if ev.instance is not None:
            detail.update(pid=ev.instance.pid, port=ev.instance.port, index=ev.instance.index)
        self.state.event(f"instance.{ev.kind}", ev.slot, **detail)
        if ev.kind == "started" and ev.instance is not None:
            # Written as soon as the process exists, so a daemon killed during the readiness wait
            # knows which process to clean up when it comes back.
            cur = self.state.slot(ev.slot)
            recs = [r for r in cur.instances if r.get("index") != ev.instance.index] + [ev.instance.to_json()]
            self.state.set_instances(ev.slot, recs)
        if ev.kind == "crashed":
            self.crashes.append((time.monotonic(), ev.slot))
            del self.crashes[:-100]
            log.warning("slot=%s instance crashed: %s", ev.slot, ev.detail)
        if ev.kind in ("restarted", "lost", "gave_up", "crashed"):
            self._pending.append(ev)

    async def sync(self) -> None:
        """Bring state and proxy in line with the supervisor after restarts (called periodically)."""
        if not self._pending:
            return
        slots = {ev.slot for ev in self._pending}
        self._pending.clear()
        for slot in slots:
            if slot not in SLOTS:
                continue
            records = [r.to_json() for r in self.supervisor.records(slot)]
            cur = self.state.slot(slot)
            if cur.state in (SlotState.LIVE, SlotState.STANDBY, SlotState.STARTING):
                self.state.set_instances(slot, records)
                await self.proxy.set_slot(slot, self.supervisor.upstreams(slot))

    def crash_count(self, slot: str, since: float) -> int:
        return sum(1 for t, s in self.crashes if s == slot and t >= since)
