"""The way back: a failed or stopped phase is unwound newest step first (before the switch the idle
slot is cleaned up, after it traffic goes back to the warm standby), a rollback that took effect
is recorded, and a full disk is unwound without the state and recorded once it can be written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from changeover.daemon.active import Active, Deployments
from changeover.daemon.model import DeploymentState, SlotState, StepKind, other
from changeover.daemon.steps import StepFailed, Undo
from changeover.errors import ChangeoverError, DeployError, RollbackError, StateWriteError
from changeover.state_schema import Release

log = logging.getLogger("changeover.deploy")
D = DeploymentState


class Unwinding(Deployments):
    """The backward half of the pipeline: what `Pipeline`'s phases call when they fail or roll back."""


    async def _roll_back(self, a: Active, reason: str, evidence: Any, *, manual: bool) -> dict[str, Any]:
        """Back to the warm standby. The state says `rolling_back` before the proxy is touched, so a
        daemon restarted in between finishes it instead of guessing."""
        if a.previous is None or not self.slots.warm(a.previous):
            self._transition(a, D.FAILED, f"{reason} (no warm standby to roll back to)")
            raise DeployError(f"{a.version} failed after the switch ({reason}) and there is no warm "
                              "standby to roll back to")
        self._transition(a, D.ROLLING_BACK, reason)
        prev = a.previous
        elapsed = await a.steps.run(StepKind.SWITCH_BACK, f"roll back to {prev}",
                                    lambda: self.slots.switch(prev, why=f"rollback: {reason}"),
                                    detail=lambda s: f"{s * 1000:.1f} ms")
        a.steps.forget(StepKind.SWITCH_BACK)
        return await self._rolled_back(a, reason, evidence, manual=manual, switch_ms=elapsed * 1000)

    async def _rolled_back(self, a: Active, reason: str, evidence: Any, *, manual: bool,
                           switch_ms: float | None = None) -> dict[str, Any]:
        """Record a rollback that has taken effect. Raises DeployError (the deploy failed); the
        result for whoever asked for the rollback is `a.outcome`."""
        prev = a.previous
        self._transition(a, D.ROLLED_BACK, reason)
        self.state.add_checks(a.id, [{"name": "rollback trigger", "kind": "monitor", "ok": False,
                                      "detail": reason, "data": evidence}])
        self.state.event("rollback", prev, version=a.old_version, reason=reason, automatic=not manual,
                         evidence=evidence)
        await self.telemetry.notify("rolled_back", {"version": a.version, "to": a.old_version, "reason": reason,
                                                    "evidence": evidence, "automatic": not manual})
        self.telemetry.count_rollback("manual" if manual else reason, prev)
        await a.emit({"type": "live", "version": a.old_version, "slot": prev, "switch_ms": switch_ms or 0.0})
        # The failed release gets no traffic; retire it in the background so it stops consuming.
        self.spawn(self._retire_quietly(a.target, f"rolled back: {reason}"))
        how = "manually" if manual else "automatically"
        a.outcome = a.result("rolled_back", reason=reason, switch_ms=switch_ms, version=a.old_version, slot=prev,
                             **{"from": a.version})
        # The deploy did not reach its goal (its waiter fails); the rollback's caller gets a.outcome.
        raise DeployError(f"{a.version} was rolled back {how}: {reason}\n{a.old_version} is live again")

    async def _failed(self, a: Active, e: BaseException) -> dict[str, Any]:
        """A step failed or the deployment was stopped: unwind what ran, newest first, and say what is
        live. Raises, except for an abort after the switch: that is the manual rollback it asked for."""
        if isinstance(e, asyncio.CancelledError) and self.closing:
            # SIGTERM (`systemctl restart`): nothing is undone; the next daemon settles or resumes
            # the deployment from its state and the proxy, exactly as after a crash.
            raise e
        aborted = a.stop is not None and a.stop.get("kind") == "abort"
        where = e.step if isinstance(e, StepFailed) else a.steps.current   # before the undo steps run
        if isinstance(e, StepFailed):
            reason = f"{e.step}: {e.cause}"
        elif isinstance(e, asyncio.CancelledError):
            reason = f"aborted: {(a.stop or {}).get('reason', 'cancelled')}"
        else:
            reason = f"{a.steps.current or a.kind}: {e}"
        switched = a.phase == D.OBSERVING
        try:
            if switched:
                self._transition(a, D.ROLLING_BACK, reason)
            problems = await a.steps.unwind()
            if switched and a.previous is not None and self.state.live_slot() == a.previous:
                if aborted and a.stop is not None:
                    who = f" (by {a.stop['actor']})" if a.stop.get("actor") else ""
                    return await self._rolled_back(a, f"manual: {a.stop.get('reason')}{who}", None, manual=True)
                return await self._rolled_back(a, reason, None, manual=False)
            new = D.ABORTED if aborted and not switched else D.FAILED
            self._transition(a, new, reason + (f" (undo: {'; '.join(problems)})" if problems else ""))
        except StateWriteError as w:   # a full disk: unwind without the state, record it later
            return await self._unwritable(a, w, reason, where, switched)
        await self.telemetry.notify("failed", {"version": a.version, "reason": reason})
        live = self.slots.version(self.state.live_slot())
        still = f"{live} is still live" if live else "nothing was live before and nothing is now"
        verb = "aborted" if new == D.ABORTED else "failed"
        raise DeployError(f"{a.kind} of {a.version} {verb} at step '{where}': "
                          f"{getattr(e, 'cause', None) or reason}\n{still}")

    async def _unwritable(self, a: Active, w: StateWriteError, reason: str, where: str | None,
                          switched: bool) -> dict[str, Any]:
        """The state cannot be written (disk full) while unwinding: do what the undo steps would
        have done without recording it (the old slot serves, the new one is stopped), and record
        the outcome as soon as a write succeeds again (`_settle_unwritten`)."""
        log.error("deployment=%d: unwinding without the state: %s", a.id, w)
        if not switched and a.target != a.previous:
            # the switch may have acted with its record the write that failed: the proxy says
            with contextlib.suppress(ChangeoverError):
                switched = await self.slots.proxy.live() == a.target
        back = switched and a.previous is not None and self.slots.warm(a.previous)
        if back and a.previous is not None:
            with contextlib.suppress(ChangeoverError):
                await self.slots.proxy.switch(a.previous)
        if a.target != a.previous and (back or not switched):
            with contextlib.suppress(ChangeoverError):
                await self.slots.proxy.remove_slot(a.target)
            await self.slots.supervisor.stop_slot(a.target)
        a.steps.undos.clear()
        self.telemetry.set_deploy_state("idle")
        failed = f"{reason} ({w})" if "disk full" not in reason else reason
        self.spawn(self._settle_unwritten(a, failed, a.previous if back else None))
        live = self.slots.version(a.previous if back or not switched else a.target)
        still = f"{live} is still live" if live else "nothing was live before and nothing is now"
        what = "disk full" if w.disk_full else "the state could not be written"
        raise DeployError(f"{a.kind} of {a.version} failed at step '{where}': {what}: {w}\n{still}; "
                          "the deployment is recorded as failed once the state can be written again")

    async def _settle_unwritten(self, a: Active, reason: str, back_to: str | None) -> None:
        """Record what `_unwritable` did, retrying until a write succeeds (or the daemon stops)."""
        while True:
            try:
                async with self._lock:
                    if back_to is not None and self.state.live_slot() != back_to:
                        self.state.swap_live(back_to, f"switch back: {reason}")
                    slot = self.state.slot(a.target)
                    if self.state.live_slot() != a.target and slot.state != "empty" \
                            and not self.slots.supervisor.records(a.target):
                        if slot.state != SlotState.STOPPING:
                            self.slots.transition(a.target, SlotState.STOPPING, why=f"{a.kind} of {a.version} failed")
                        self.slots.transition(a.target, SlotState.EMPTY, release_id=None, instances=[],
                                              why=f"{a.kind} of {a.version} failed")
                    row = self.state.deployment(a.id)
                    if row is not None and not row.status.finished:
                        self.state.transition_deployment(a.id, D.FAILED, reason)
                log.info("deployment=%d recorded as failed now that the state can be written", a.id)
                return
            except StateWriteError:
                await asyncio.sleep(1.0)

    async def _aborted(self, a: Active) -> dict[str, Any]:
        return await self._failed(a, asyncio.CancelledError())

    async def _warm_rollback(self, a: Active, schema: bool, allow_data_loss: bool) -> dict[str, Any]:
        current = a.old_version
        try:
            elapsed = await a.steps.run(StepKind.SWITCH, f"switch to {a.target}",
                                        lambda: self.slots.switch(a.target, why="rollback"),
                                        detail=lambda s: f"{s * 1000:.1f} ms")
        except StepFailed as e:
            self._transition(a, D.FAILED, f"{e.step}: {e.cause}")
            raise RollbackError(f"rollback to {a.version} failed at '{e.step}': {e.cause}\n"
                                f"{current} is still live") from None
        a.switch_ms = elapsed * 1000
        if schema and a.previous is not None:
            rolled = self.state.release(self.state.slot(a.previous).release_id)
            try:
                if rolled is not None:
                    await self.verify.rollback_schema(a.steps, a.config, rolled, allow_data_loss)
            except StepFailed as e:
                self._transition(a, D.FAILED, f"{e.step}: {e.cause}")
                raise RollbackError(f"{a.version} is live again (code and config), but the schema rollback "
                                    f"failed: {e.cause}\nthe database is consistent; see `changeover migrate "
                                    "status`") from None
        self._transition(a, D.SUCCEEDED)
        row = self.state.deployment(a.id)
        self.state.event("rollback", a.target, version=a.version, reason=row.reason if row else "manual",
                         automatic=False)
        self.telemetry.count_rollback("manual", a.target)
        await self.telemetry.notify("rolled_back", {"version": current, "to": a.version,
                                                    "reason": "manual", "automatic": False})
        await a.emit({"type": "live", "version": a.version, "slot": a.target, "switch_ms": a.switch_ms})
        return a.result("succeeded", switch_ms=a.switch_ms, **{"from": current})

    def _cleanup_undo(self, a: Active) -> Undo:
        return Undo(StepKind.CLEANUP, f"clean up {a.target}",
                    lambda: self.slots.retire(a.target, drain=False, why=f"{a.kind} of {a.version} stopped"))

    def _rollback_target(self, live: str) -> Release:
        standby = self.state.slot(other(live))
        if standby.release_id is not None and standby.state in ("standby", "live"):
            rel = self.state.release(standby.release_id)
            if rel is not None:
                return rel
        live_release = self.state.slot(live).release_id
        live_version = self.slots.version(live)
        for dep in self.state.deployments(limit=200):
            if dep.release_id is None or dep.release_id == live_release or dep.version == live_version:
                continue
            if dep.state == "succeeded":
                rel = self.state.release(dep.release_id)
                if rel is not None:
                    return rel
        raise RollbackError(f"no earlier release to roll back to ({live_version} is the only one deployed)")

    async def _resume_rollback(self, a: Active, reason: str) -> dict[str, Any]:
        manual = reason.startswith("manual")
        if a.previous is not None and self.state.live_slot() != a.previous and self.slots.warm(a.previous):
            prev = a.previous
            await a.steps.run(StepKind.SWITCH_BACK, f"roll back to {prev}",
                              lambda: self.slots.switch(prev, why=f"rollback (resumed): {reason}"),
                              detail=lambda s: f"{s * 1000:.1f} ms")
        if self.state.live_slot() != a.previous:
            self._transition(a, D.FAILED, f"{reason} (the standby was gone after a restart)")
            raise DeployError(f"could not finish rolling back {a.version}: no warm standby after the restart")
        a.steps.undos.clear()
        return await self._rolled_back(a, reason, None, manual=manual)
