"""The deploy and rollback pipelines: a plan of steps that only move forward.

deploy VERSION:
  pre-deploy checks -> expand migrations -> retire the old standby -> start the idle slot ->
  verify it privately (version, smoke, flows, old code on the new schema, session sign-in) ->
  switch -> verify through the proxy (session continuity, smoke, flows) -> observe -> finalise.
Until the switch nothing users see has changed, so a failure there just cleans up the idle slot.
After the switch a failure switches back to the warm standby.

rollback: switch to the warm standby (milliseconds), or start the previous release in the idle
slot and switch to it when the standby is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover.config import Config, release_env
from changeover.daemon.gates import Gates
from changeover.daemon.slots import SlotManager, other
from changeover.daemon.steps import StepFailed, StepRunner
from changeover.errors import ChangeoverError, DeployError, DeployInProgress, RollbackError, UsageError
from changeover.rpc import Emit
from changeover.state import Release, State

log = logging.getLogger("changeover.deploy")


@dataclass
class Active:
    """The deployment in progress (at most one)."""

    id: int
    kind: str
    version: str
    started: float
    phase: str = "running"                       # running | observing
    live_event: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[dict[str, Any]] | None = None
    observer_cancel: Callable[[str | None, str | None], None] | None = None
    rollback_result: dict[str, Any] | None = None
    listeners: list[Emit] = field(default_factory=list)

    async def emit(self, event: dict[str, Any]) -> None:
        for fn in list(self.listeners):
            try:
                await fn(event)
            except Exception:  # a CLI that went away must not stop the deploy
                self.listeners.remove(fn)


class Pipeline:
    def __init__(self, config: Config, state: State, slots: SlotManager, gates: Gates) -> None:
        self.config = config
        self.state = state
        self.slots = slots
        self.gates = gates
        self.active: Active | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- entry points --------------------------------------------------------------------------
    def busy_error(self) -> DeployInProgress:
        a = self.active
        assert a is not None
        since = time.strftime("%H:%M:%S", time.localtime(a.started))
        what = "is in its observation window" if a.phase == "observing" else "is running"
        return DeployInProgress(f"{a.kind} of {a.version} (deployment #{a.id}) {what} since {since}; "
                                "wait for it, or `changeover rollback` to abort it")

    async def deploy(self, version: str, path: str, emit: Emit, *, wait: bool = False,
                     env: dict[str, str] | None = None, actor: str | None = None) -> dict[str, Any]:
        if self.active is not None:
            raise self.busy_error()
        app_dir = Path(path).expanduser()
        if not app_dir.is_absolute():
            app_dir = (self.config.root / app_dir).resolve()
        if not app_dir.is_dir():
            raise UsageError(f"--path {path}: no such directory")
        if not version or any(c.isspace() for c in version):
            raise UsageError(f"version {version!r}: expected a non-empty name without spaces")
        a = await self._reserve("deploy", version)
        try:
            live = self.state.live_slot()
            release = self.state.add_release(version, str(app_dir), list(self.config.app.command),
                                             release_env(self.config, version, env))
            target = other(live)
            a.id = self.state.begin_deployment("deploy", version, release.id, self.slots.version(live), target,
                                               actor=actor)
        except BaseException:
            self._release()
            raise
        return await self._follow(self._run_deploy(release, live, target), emit, wait)

    async def rollback(self, emit: Emit, *, reason: str | None = None, actor: str | None = None,
                       wait: bool = True, schema: bool = False, allow_data_loss: bool = False) -> dict[str, Any]:
        a = self.active
        if a is not None and a.phase == "observing" and a.observer_cancel is not None and schema:
            raise RollbackError(f"{a.version} is in its observation window: roll back its code first "
                                "(`changeover rollback`), then its schema (`changeover rollback --schema`)")
        if a is not None and a.phase == "observing" and a.observer_cancel is not None:
            # A manual rollback during the window: stop observing; the deploy task then rolls back.
            a.observer_cancel(reason, actor)
            assert a.done is not None
            try:
                await asyncio.shield(a.done)
            except DeployError:
                pass
            if a.rollback_result is None:
                raise RollbackError(f"the deploy of {a.version} ended before it could be rolled back; "
                                    "see `changeover history`")
            return a.rollback_result
        a = await self._reserve("rollback", "?")
        try:
            live = self.state.live_slot()
            if live is None:
                raise RollbackError("nothing is live, so there is nothing to roll back")
            standby = other(live)
            target_release = self._rollback_target(live)
            a.version = target_release.version
            a.id = self.state.begin_deployment("rollback", target_release.version, target_release.id,
                                               self.slots.version(live), standby, actor=actor,
                                               reason=reason or "manual rollback")
        except BaseException:
            self._release()
            raise
        return await self._follow(self._run_rollback(target_release, live, standby, reason, schema,
                                                     allow_data_loss), emit, wait)

    async def _reserve(self, kind: str, version: str) -> Active:
        """Claim the one deployment slot at once (a second deploy is refused, not queued), then
        wait for the lock, which only background work (retiring a slot) holds, and briefly."""
        if self.active is not None:
            raise self.busy_error()
        a = self.active = Active(0, kind, version, time.time())
        try:
            await self._lock.acquire()
        except BaseException:
            self.active = None
            raise
        return a

    def _release(self) -> None:
        self.active = None
        self._lock.release()

    async def stop_standby(self) -> dict[str, Any]:
        if self.active is not None:
            raise self.busy_error()
        async with self._lock:
            live = self.state.live_slot()
            standby = other(live)
            slot = self.state.slot(standby)
            if slot.state == "empty":
                return {"stopped": None}
            version = self.slots.version(standby)
            await self.slots.retire(standby, why="stop-standby")
            return {"stopped": {"slot": standby, "version": version}}

    # -- the runs ------------------------------------------------------------------------------
    async def _follow(self, coro: Awaitable[dict[str, Any]], emit: Emit, wait: bool) -> dict[str, Any]:
        """Run the pipeline as a task of its own (a CLI going away must not cancel it) and stream it."""
        a = self.active
        assert a is not None
        a.listeners.append(emit)
        loop = asyncio.get_running_loop()
        a.done = loop.create_future()
        # Without --wait nobody may await the outcome; it is in the history, not an asyncio warning.
        a.done.add_done_callback(lambda f: None if f.cancelled() else f.exception())

        async def runner() -> None:
            assert a.done is not None
            try:
                result = await coro
                a.done.set_result(result)
            except BaseException as e:
                a.done.set_exception(e)
                if not isinstance(e, ChangeoverError | asyncio.CancelledError):
                    log.exception("pipeline crashed")
            finally:
                self.active = None
                if self._lock.locked():
                    self._lock.release()
                a.live_event.set()

        task = loop.create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if wait:
            return await asyncio.shield(a.done)
        live_wait: asyncio.Future[Any] = loop.create_task(a.live_event.wait())
        await asyncio.wait([live_wait, a.done], return_when=asyncio.FIRST_COMPLETED)
        live_wait.cancel()
        if a.done.done():
            return a.done.result()
        a.listeners.remove(emit)
        return {"state": "live", "deployment": a.id, "version": a.version, "observing": True}

    async def _run_deploy(self, release: Release, live: str | None, target: str) -> dict[str, Any]:
        a = self.active
        assert a is not None
        steps = StepRunner(self.state, a.id, a.emit)
        old_version = self.slots.version(live)
        switched = False
        await a.emit({"type": "plan", "deployment": a.id, "version": release.version, "slot": target,
                      "live": old_version})
        try:
            await self.gates.pre_deploy(steps, release)
            migrated = await self.gates.migrate_expand(steps, release)
            if self.state.slot(target).state != "empty" or self.slots.supervisor.records(target):
                await steps.run(f"retire standby {target}", lambda: self.slots.retire(
                    target, why=f"making room for {release.version}"))
            await steps.run(f"start {target}", lambda: self.slots.start(target, release),
                            detail=lambda recs: ", ".join(f"pid {r.pid} port {r.port}" for r in recs))
            await self.gates.verify_private(steps, release, target, live, migrated)
            elapsed = await steps.run(f"switch to {target}", lambda: self.slots.switch(target),
                                      detail=lambda s: f"{s * 1000:.1f} ms")
            switched = True
            self.state.set_deployment(a.id, "observing", finished=False)
            a.phase = "observing"
            await a.emit({"type": "live", "version": release.version, "slot": target, "switch_ms": elapsed * 1000})
            await self.gates.verify_public(steps, release, target, live)
            a.live_event.set()  # `deploy` without --wait returns here: live and verified through the proxy
            verdict = await self.gates.observe(steps, release, target, live, a)
        except StepFailed as e:
            return await self._deploy_failed(steps, a, release, target, live, old_version, switched, e)
        except asyncio.CancelledError:
            raise
        except ChangeoverError as e:
            return await self._deploy_failed(steps, a, release, target, live, old_version, switched,
                                             StepFailed(steps.current or "deploy", str(e)))
        if verdict is not None and not verdict.get("ok", True):
            return await self._auto_rollback(steps, a, release, target, live, old_version, verdict)
        self.state.set_deployment(a.id, "succeeded")
        self.state.event("deploy.finalised", target, version=release.version)
        await self.gates.notify("finalised", {"version": release.version, "slot": target})
        self.gates.schedule_standby_expiry(self, live)
        return {"state": "succeeded", "deployment": a.id, "version": release.version, "slot": target,
                "switch_ms": elapsed * 1000}

    async def _deploy_failed(self, steps: StepRunner, a: Active, release: Release, target: str, live: str | None,
                             old_version: str | None, switched: bool, e: StepFailed) -> dict[str, Any]:
        if switched and live is not None and self.slots.warm(live):
            await steps.run(f"switch back to {live}", lambda: self.slots.switch(live),
                            detail=lambda s: f"{s * 1000:.1f} ms")
            switched = False
        if not switched:
            try:
                await steps.run(f"clean up {target}", lambda: self.slots.retire(target, drain=False,
                                                                                why="deploy failed"))
            except StepFailed:
                log.exception("cleaning up slot %s failed", target)
        reason = f"{e.step}: {e.cause}"
        self.state.set_deployment(a.id, "failed", reason)
        await self.gates.notify("failed", {"version": release.version, "reason": reason})
        still = f"{old_version} is still live" if old_version else "nothing was live before and nothing is now"
        raise DeployError(f"deploy of {release.version} failed at step '{e.step}': {e.cause}\n{still}")

    async def _auto_rollback(self, steps: StepRunner, a: Active, release: Release, target: str, live: str | None,
                             old_version: str | None, verdict: dict[str, Any]) -> dict[str, Any]:
        reason = str(verdict.get("reason", "rollback"))
        manual = verdict.get("manual")
        if verdict.get("refused") and not manual:
            self.state.set_deployment(a.id, "succeeded", f"automatic rollback refused: {reason}")
            await self.gates.notify("rollback_refused", {"version": release.version, "reason": reason,
                                                         "evidence": verdict.get("evidence")})
            raise DeployError(f"{release.version} is live but failing ({reason}); automatic rollback was refused "
                              f"because {verdict['refused']}. Decide: `changeover rollback` (code only) "
                              "or fix forward.")
        if live is None or not self.slots.warm(live):
            self.state.set_deployment(a.id, "failed", f"{reason} (no warm standby to roll back to)")
            raise DeployError(f"{release.version} failed after the switch ({reason}) and there is no warm "
                              "standby to roll back to")
        elapsed = await steps.run(f"roll back to {live}", lambda: self.slots.switch(live),
                                  detail=lambda s: f"{s * 1000:.1f} ms")
        how = "manually" if manual else "automatically"
        if manual:
            reason = f"manual: {manual.get('reason')}" + (f" (by {manual['actor']})" if manual.get("actor") else "")
        self.state.set_deployment(a.id, "rolled_back", reason)
        self.state.add_checks(a.id, [{"name": "rollback trigger", "kind": "monitor", "ok": False,
                                      "detail": reason, "data": verdict.get("evidence")}])
        self.state.event("rollback", live, version=old_version, reason=reason, automatic=not manual,
                         evidence=verdict.get("evidence"))
        await self.gates.notify("rolled_back", {"version": release.version, "to": old_version, "reason": reason,
                                                "evidence": verdict.get("evidence"), "automatic": not manual})
        self.gates.count_rollback("manual" if manual else reason)
        a.rollback_result = {"state": "succeeded", "deployment": a.id, "version": old_version, "slot": live,
                             "switch_ms": elapsed * 1000, "from": release.version}
        await a.emit({"type": "live", "version": old_version, "slot": live, "switch_ms": elapsed * 1000})
        if not manual:
            # The failed release gets no traffic; retire it in the background so it stops consuming.
            self._spawn(self._retire_quietly(target, f"rolled back: {reason}"))
        raise DeployError(f"{release.version} was rolled back {how}: {reason}\n{old_version} is live again")

    async def _run_rollback(self, target: Release, live: str, standby: str, reason: str | None,
                            schema: bool = False, allow_data_loss: bool = False) -> dict[str, Any]:
        a = self.active
        assert a is not None
        steps = StepRunner(self.state, a.id, a.emit)
        current = self.slots.version(live)
        try:
            if not (self.slots.warm(standby) and self.state.slot(standby).release_id == target.id):
                if self.state.slot(standby).state != "empty" or self.slots.supervisor.records(standby):
                    await steps.run(f"retire {standby}", lambda: self.slots.retire(standby, why="rollback"))
                await steps.run(f"start {target.version} in {standby}", lambda: self.slots.start(standby, target))
            elapsed = await steps.run(f"switch to {standby}", lambda: self.slots.switch(standby),
                                      detail=lambda s: f"{s * 1000:.1f} ms")
        except StepFailed as e:
            self.state.set_deployment(a.id, "failed", f"{e.step}: {e.cause}")
            raise RollbackError(f"rollback to {target.version} failed at '{e.step}': {e.cause}\n"
                                f"{current} is still live") from None
        if schema and current is not None:
            try:
                await self.gates.rollback_schema(steps, current, allow_data_loss)
            except StepFailed as e:
                self.state.set_deployment(a.id, "failed", f"{e.step}: {e.cause}")
                raise RollbackError(f"{target.version} is live again (code and config), but the schema rollback "
                                    f"failed: {e.cause}\nthe database is consistent; see `changeover migrate "
                                    "status`") from None
        self.state.set_deployment(a.id, "succeeded")
        self.state.event("rollback", standby, version=target.version, reason=reason or "manual", automatic=False)
        self.gates.count_rollback("manual")
        await self.gates.notify("rolled_back", {"version": current, "to": target.version,
                                                "reason": reason or "manual", "automatic": False})
        await a.emit({"type": "live", "version": target.version, "slot": standby, "switch_ms": elapsed * 1000})
        return {"state": "succeeded", "deployment": a.id, "version": target.version, "slot": standby,
                "switch_ms": elapsed * 1000, "from": current}

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

    async def _retire_quietly(self, slot: str, why: str) -> None:
        try:
            async with self._lock:
                if self.state.live_slot() != slot:
                    await self.slots.retire(slot, why=why)
        except ChangeoverError as e:
            log.warning("retiring %s failed: %s", slot, e)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def wrap() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(wrap())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
