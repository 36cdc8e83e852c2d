"""Settling the state after a daemon start: adopt what runs, clean what a crash left half-done, and
say which deployment to carry on from where.

The data plane kept running while the daemon was away, so it is the truth about which slot users
reach; the state follows it, never the other way round. The rules, in order:

1. The live slot: when the adopted data plane serves a slot that holds a release, that slot is
   live in the state too (a daemon killed between the proxy's switch and the state's write).
2. Deployments in flight, decided by their step kinds and the live slot, never by step labels:
   - `rolling_back`, or a switch back had begun: the rollback is finished (`resume: rollback`);
   - switched (a `switch` step ran and the new slot is live): resumed at verification through the
     proxy, or at the observation window when it had opened (`resume: verify` / `observe`);
     a warm manual rollback that reached its switch succeeded;
   - otherwise nothing users see had changed: the deployment failed (interrupted), and the slot it
     was starting is cleaned up below.
3. Live and standby slots adopt their instances (pid alive and start time unchanged). A live slot
   whose processes are all gone (a reboot) is started again from its release. A process tagged as
   an instance of a slot that is now empty is an orphan and is stopped.
4. The data plane is told each slot's upstreams; when it serves nothing (a new one), the live slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from changeover.daemon.instances import InstanceRecord
from changeover.daemon.model import DeploymentKind, DeploymentState, SlotState, StepKind
from changeover.daemon.procs import kill_orphans, proc_start
from changeover.daemon.slots import SlotManager, spec_of
from changeover.errors import ChangeoverError
from changeover.proxy.control import ProxyControl
from changeover.state import SLOTS, State

log = logging.getLogger("changeover.recovery")
D = DeploymentState


@dataclass(frozen=True)
class Resume:
    """A deployment the new daemon carries on: at "verify", "observe" or "rollback"."""

    deployment: int
    at: str


async def _kill_stale(records: list[InstanceRecord]) -> None:
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
                await asyncio.sleep(0.05)   # never block the event loop: the control socket must answer
            if proc_start(r.pid) != r.proc_start:
                break


def _follow_proxy(state: State, proxy_live: str | None) -> None:
    if proxy_live not in SLOTS or proxy_live == state.live_slot():
        return
    assert proxy_live is not None
    slot = state.slot(proxy_live)
    if slot.release_id is None or slot.state in (SlotState.EMPTY, SlotState.STOPPING):
        return
    log.warning("the proxy serves slot %s, the state said %s: the state follows the proxy",
                proxy_live, state.live_slot())
    state.swap_live(proxy_live, "recovery: the proxy serves it")


def _settle(state: State, dep_id: int) -> Resume | None:
    dep = state.deployment(dep_id)
    assert dep is not None
    steps = state.steps(dep.id)
    kinds = {s.kind for s in steps}
    live = state.live_slot()
    switched = StepKind.SWITCH in kinds and dep.slot is not None and live == dep.slot
    resume: Resume | None = None
    if dep.status == D.ROLLING_BACK or StepKind.SWITCH_BACK in kinds:
        if dep.status != D.ROLLING_BACK:
            state.transition_deployment(dep.id, D.ROLLING_BACK, "interrupted while switching back")
        resume = Resume(dep.id, "rollback")
    elif switched and dep.kind == DeploymentKind.ROLLBACK and StepKind.START not in kinds:
        state.transition_deployment(dep.id, D.SUCCEEDED, "the daemon restarted after the switch; "
                                    "the rollback had taken effect")
    elif switched:
        if dep.status != D.OBSERVING:
            state.transition_deployment(dep.id, D.OBSERVING)
        resume = Resume(dep.id, "observe" if StepKind.OBSERVE in kinds else "verify")
    else:
        where = next((s.name for s in reversed(steps) if s.state == "running"), None) or \
            (steps[-1].name if steps else "start")
        state.transition_deployment(dep.id, D.FAILED, f"interrupted: the daemon stopped during '{where}'; "
                                    "nothing users see had changed")
    for s in steps:
        if s.state == "running":
            state.end_step(s.id, "failed", "interrupted: the daemon stopped")
    settled = state.deployment(dep.id)
    state.event("recovery.deployment", dep.slot, deployment=dep.id, state=settled.state if settled else None,
                resume=resume.at if resume else None)
    return resume


async def recover(state: State, slots: SlotManager, proxy: ProxyControl, adopted: bool) -> list[Resume]:
    """Bring the state in line with what runs; returns the deployments to carry on."""
    proxy_live = await proxy.live() if adopted else None
    if adopted:
        _follow_proxy(state, proxy_live)
    resumes = [r for dep in state.running_deployments() if (r := _settle(state, dep.id)) is not None]
    keep = {state.deployment(r.deployment).slot for r in resumes}  # type: ignore[union-attr]

    for name in SLOTS:
        slot = state.slot(name)
        records = [InstanceRecord.from_json(r) for r in slot.instances]
        release = state.release(slot.release_id)
        if slot.state in (SlotState.STARTING, SlotState.STOPPING) or (slot.state != SlotState.EMPTY
                                                                        and release is None):
            await _kill_stale(records)
            if slot.state == SlotState.STARTING:
                state.transition_slot(name, SlotState.STOPPING, why="recovery: half-started slot")
            state.transition_slot(name, SlotState.EMPTY, release_id=None, instances=[],
                                  why="recovery: half-done slot")
            await proxy.remove_slot(name)
            continue
        if slot.state not in (SlotState.LIVE, SlotState.STANDBY) or release is None:
            continue
        alive = slots.supervisor.adopt(name, spec_of(release), records)
        state.set_instances(name, [r.to_json() for r in alive])
        log.info("slot=%s adopted %d of %d instances of %s", name, len(alive), len(records), release.version)
        if not alive:
            if slot.state == SlotState.STANDBY and name not in keep:
                state.transition_slot(name, SlotState.EMPTY, release_id=None, instances=[],
                                      why="recovery: standby is gone")
                await proxy.remove_slot(name)
                continue
            try:
                recs = await slots.supervisor.start_slot(name, spec_of(release))
                state.set_instances(name, [r.to_json() for r in recs])
                state.event("recovery.restarted", name, version=release.version)
            except ChangeoverError as e:
                log.error("slot=%s release %s could not be restarted: %s", name, release.version, e)
                state.event("recovery.failed", name, version=release.version, error=str(e))
        await proxy.set_slot(name, slots.supervisor.upstreams(name))
        await proxy.set_version(name, release.version)

    # An empty slot runs nothing: a process tagged with it was spawned just before the daemon
    # died, before its pid was recorded. Found by its environment tag, stopped.
    empty = [name for name in SLOTS if state.slot(name).state == SlotState.EMPTY]
    orphans = kill_orphans(slots.supervisor.owner, empty, keep=slots.linger.pids())
    if orphans:
        log.warning("stopped %d orphaned instance process group(s): %s", len(orphans), orphans)
        state.event("recovery.orphans", None, pgids=orphans)

    live = state.live_slot()
    if proxy_live is None and live is not None:
        await proxy.switch(live)   # a data plane that serves nothing yet: tell it the live slot
        log.info("proxy live slot=%s (from state: the proxy served nothing)", live)
    return resumes


def routing(state: State, slots: SlotManager) -> dict[str, Any]:
    """What a proxy must know: every routable slot's upstreams and release, and the live slot."""
    out: dict[str, Any] = {"slots": {}, "versions": {}, "live": state.live_slot()}
    for name in SLOTS:
        slot = state.slot(name)
        release = state.release(slot.release_id)
        if slot.state in (SlotState.LIVE, SlotState.STANDBY, SlotState.STARTING) and release is not None:
            out["slots"][name] = [list(u) for u in slots.supervisor.upstreams(name)]
            out["versions"][name] = release.version
    return out


async def configure_proxy(state: State, slots: SlotManager, proxy: ProxyControl) -> None:
    """Tell a proxy (a fresh one after a crash or a handover) every slot's upstreams and the live slot."""
    plan = routing(state, slots)
    for name, upstreams in plan["slots"].items():
        await proxy.set_slot(name, [(h, int(p)) for h, p in upstreams])
        await proxy.set_version(name, plan["versions"][name])
    await proxy.switch(plan["live"])
