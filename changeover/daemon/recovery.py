"""Settling the state after a daemon start: adopt what runs, clean what a crash left half-done.

The rules, in order:
1. A deployment still `running` was interrupted. If its switch step had begun, the proxy (which
   kept running) says which slot is really live and the state follows it. Otherwise the
   deployment is marked failed and its half-started slot is cleaned up.
2. Live and standby slots adopt their instances (pid alive and start time unchanged). A live
   slot whose processes are all gone (e.g. after a reboot) is started again from its release.
   A process tagged as an instance of a slot that is now empty is an orphan and is stopped.
3. The proxy is told each slot's upstreams and which slot is live, so it matches the state.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from changeover.daemon.procs import kill_orphans, proc_start
from changeover.daemon.slots import SlotManager, spec_of
from changeover.daemon.supervisor import InstanceRecord
from changeover.errors import ChangeoverError
from changeover.proxy.remote import ProxyProcess
from changeover.state import SLOTS, State

log = logging.getLogger("changeover.recovery")


def _kill_stale(records: list[InstanceRecord]) -> None:
    """Kill leftovers of an interrupted start, only if the pid is still the process we started."""
    for r in records:
        if proc_start(r.pid) != r.proc_start:
            continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(r.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and proc_start(r.pid) == r.proc_start:
                time.sleep(0.05)
            if proc_start(r.pid) != r.proc_start:
                break


async def recover(state: State, slots: SlotManager, proxy: ProxyProcess) -> None:
    proxy_live = await proxy.live()
    for dep in state.running_deployments():
        steps = state.steps(dep.id)
        switch_began = any(s.name.startswith(("switch to", "roll back to")) for s in steps)
        if dep.state == "observing" or (switch_began and proxy_live == dep.slot):
            # The new release had gone live; the proxy kept it live. Keep that truth.
            if state.live_slot() != dep.slot and dep.slot is not None:
                state.swap_live(dep.slot)
            state.set_deployment(dep.id, "succeeded", "the daemon restarted during observation; "
                                 "the release stayed live")
        else:
            where = next((s.name for s in reversed(steps) if s.state == "running"), "start")
            state.set_deployment(dep.id, "failed", f"interrupted: the daemon stopped during '{where}'")
        for s in steps:
            if s.state == "running":
                state.end_step(s.id, "failed", "interrupted: the daemon stopped")
        settled = state.deployment(dep.id)
        state.event("recovery.deployment", dep.slot, deployment=dep.id, state=settled.state if settled else None)

    for name in SLOTS:
        slot = state.slot(name)
        records = [InstanceRecord.from_json(r) for r in slot.instances]
        release = state.release(slot.release_id)
        if slot.state in ("starting", "stopping") or (slot.state != "empty" and release is None):
            _kill_stale(records)
            slots.transition(name, "empty", release_id=None, instances=[], why="recovery: half-done slot")
            await proxy.remove_slot(name)
            continue
        if slot.state not in ("live", "standby") or release is None:
            continue
        alive = slots.supervisor.adopt(name, spec_of(release), records)
        state.set_slot(name, slot.state, instances=[r.to_json() for r in alive])
        log.info("slot=%s adopted %d of %d instances of %s", name, len(alive), len(records), release.version)
        if not alive:
            if slot.state == "standby":
                slots.transition(name, "empty", release_id=None, instances=[], why="recovery: standby is gone")
                await proxy.remove_slot(name)
                continue
            try:
                recs = await slots.supervisor.start_slot(name, spec_of(release))
                state.set_slot(name, "live", instances=[r.to_json() for r in recs])
                state.event("recovery.restarted", name, version=release.version)
            except ChangeoverError as e:
                log.error("slot=%s live release %s could not be restarted: %s", name, release.version, e)
                state.event("recovery.failed", name, version=release.version, error=str(e))
        await proxy.set_slot(name, slots.supervisor.upstreams(name))
        await proxy.set_version(name, release.version)

    # An empty slot runs nothing: a process tagged with it was spawned just before the daemon
    # died, before its pid was recorded. Found by its environment tag, stopped.
    empty = [name for name in SLOTS if state.slot(name).state == "empty"]
    orphans = kill_orphans(slots.supervisor.owner, empty)
    if orphans:
        log.warning("stopped %d orphaned instance process group(s): %s", len(orphans), orphans)
        state.event("recovery.orphans", None, pgids=orphans)

    live = state.live_slot()
    if proxy_live != live:
        await proxy.switch(live)
        log.info("proxy live slot=%s was=%s (from state)", live, proxy_live)


def routing(state: State, slots: SlotManager) -> dict[str, Any]:
    """What a proxy must know: every routable slot's upstreams and release, and the live slot."""
    out: dict[str, Any] = {"slots": {}, "versions": {}, "live": state.live_slot()}
    for name in SLOTS:
        slot = state.slot(name)
        release = state.release(slot.release_id)
        if slot.state in ("live", "standby", "starting") and release is not None:
            out["slots"][name] = [list(u) for u in slots.supervisor.upstreams(name)]
            out["versions"][name] = release.version
    return out


async def configure_proxy(state: State, slots: SlotManager, proxy: ProxyProcess) -> None:
    """Tell a proxy (a fresh one after a crash or a handover) every slot's upstreams and the live slot."""
    plan = routing(state, slots)
    for name, upstreams in plan["slots"].items():
        await proxy.set_slot(name, [(h, int(p)) for h, p in upstreams])
        await proxy.set_version(name, plan["versions"][name])
    await proxy.switch(plan["live"])
