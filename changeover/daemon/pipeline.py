"""The deploy as phase verbs: prepare, switch, observe, finalise, abort. `deploy` chains them.

    prepare   pre-deploy checks -> expand migrations -> retire the old standby -> start the idle slot
              -> verify it privately (version, smoke, flows, old code on the new schema, session
              sign-in). Nothing users see changes; the deployment is then `prepared`.
    switch    the proxy sends new requests to the new slot -> verify through the proxy.
    observe   the observation window; a trigger rolls back to the warm standby.
    finalise  the deployment succeeded; the standby is kept `keep_standby`, then retired.
    abort     unwind what ran, newest first: before the switch the idle slot is cleaned up, after it
              traffic goes back to the old slot (a rollback).

At most one deployment is active. Each phase runs as a task of its own (a CLI that goes away does
not stop it) and records its steps before they act; every state change goes through
`State.transition_deployment`. A daemon restarted in the middle picks the deployment up again
(daemon/recovery.py decides where, `resume` carries on).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from changeover.config import Config, release_env
from changeover.daemon import build_steps, builds
from changeover.daemon.active import Active
from changeover.daemon.model import DeploymentKind, DeploymentState, StepKind, other
from changeover.daemon.observation import Observation
from changeover.daemon.steps import StepRunner, Undo
from changeover.daemon.unwind import Unwinding
from changeover.errors import ChangeoverError, DeployError, RollbackError, UsageError
from changeover.rpc import Emit

log = logging.getLogger("changeover.deploy")
D = DeploymentState


class Pipeline(Unwinding):
    """The phase verbs; the active deployment's bookkeeping is in `Deployments` (active.py), the way
    back in `Unwinding` (unwind.py)."""


    # -- verbs -----------------------------------------------------------------------------------
    async def deploy(self, config: Config, version: str, path: str, emit: Emit | None = None, *,
                     wait: bool = False, env: dict[str, str] | None = None, actor: str | None = None,
                     no_switch: bool = False, source: builds.Source | None = None) -> dict[str, Any]:
        """prepare -> switch -> observe -> finalise (or only prepare, with no_switch). `config` is the
        file as it is now (the daemon re-reads it for every deploy)."""
        if self.active is not None:
            raise self.busy_error()
        if source is not None:   # releases/VERSION, made by the prepare phase's first step
            path = str(builds.release_dir(config, version))
        app_dir = Path(path).expanduser()
        if not app_dir.is_absolute():
            app_dir = (config.root / app_dir).resolve()
        if not app_dir.is_dir() and source is None:
            raise UsageError(f"--path {path}: no such directory")
        if not version or any(c.isspace() for c in version):
            raise UsageError(f"version {version!r}: expected a non-empty name without spaces")
        if config.app is None:
            raise UsageError(f"{config.file}: [app] is needed to deploy (command, health_path)")
        await self._claim()
        try:
            release = self.state.add_release(version, str(app_dir), list(config.app.command),
                                             release_env(config, version, env), app_settings(config))
            a = self._begin(config, DeploymentKind.DEPLOY, release, other(self.state.live_slot()), actor)
            a.source = source
        except BaseException:
            self._lock.release()
            raise
        await a.emit({"type": "plan", "deployment": a.id, "version": version, "slot": a.target,
                      "live": a.old_version})
        if no_switch:
            self._run(a, self._prepare(a), final=False)
            return await self._follow(a, emit, wait=True)
        self._run(a, self._chain(a, prepare=True))
        return await self._follow(a, emit, wait)

    async def switch(self, emit: Emit | None = None, *, wait: bool = False) -> dict[str, Any]:
        """Switch a prepared deployment live, then observe and finalise it."""
        a = self.active
        if a is None or a.phase != D.PREPARED:
            what = "nothing is prepared" if a is None else f"deployment #{a.id} is {a.phase}, not prepared"
            raise DeployError(f"{what}: `changeover deploy VERSION --path DIR --no-switch` prepares one")
        self._run(a, self._chain(a, prepare=False))
        return await self._follow(a, emit, wait)

    async def promote(self, actor: str | None = None) -> dict[str, Any]:
        """End the observation window now and finalise."""
        a = self.active
        if a is None or a.phase != D.OBSERVING or a.observation is None:
            if a is not None and a.phase == D.PREPARED:
                raise DeployError(f"deployment #{a.id} of {a.version} is prepared, not live: `changeover switch` first")
            raise DeployError("no deployment is in its observation window")
        a.stop = {"kind": "promote", "actor": actor}
        a.observation.stop("promote", {"actor": actor})
        assert a.done is not None
        return await asyncio.shield(a.done)

    async def abort(self, reason: str | None = None, actor: str | None = None) -> dict[str, Any]:
        """Stop the active deployment: unwind before the switch, switch back after it."""
        a = self.active
        if a is None:
            raise DeployError("no deployment is in progress")
        a.stop = {"kind": "abort", "reason": reason or "aborted", "actor": actor}
        if a.observation is not None:
            a.observation.stop("manual", {"reason": reason or "aborted", "actor": actor})
        elif a.task is not None:
            a.task.cancel()
        else:  # prepared and idle: nothing runs, unwind here
            self._run(a, self._aborted(a))
        assert a.done is not None
        try:
            return await asyncio.shield(a.done)
        except DeployError as e:
            if a.outcome is not None:
                return a.outcome
            row = self.state.deployment(a.id)
            return a.result(row.state if row else "aborted", message=str(e), live_version=self.slots.version(
                self.state.live_slot()))

    async def rollback(self, config: Config, emit: Emit | None = None, *, reason: str | None = None,
                       actor: str | None = None, wait: bool = True, schema: bool = False,
                       allow_data_loss: bool = False) -> dict[str, Any]:
        a = self.active
        if a is not None and a.kind == DeploymentKind.DEPLOY and a.phase != D.ROLLING_BACK:
            if schema and a.phase == D.OBSERVING:
                raise RollbackError(f"{a.version} is in its observation window: roll back its code first "
                                    "(`changeover rollback`), then its schema (`changeover rollback --schema`)")
            out = await self.abort(reason or "manual rollback", actor)
            out.setdefault("version", self.slots.version(self.state.live_slot()))
            return {**out, "version": self.slots.version(self.state.live_slot()), "slot": self.state.live_slot(),
                    "from": a.version}
        if a is not None:
            raise self.busy_error()
        await self._claim()
        try:
            live = self.state.live_slot()
            if live is None:
                raise RollbackError("nothing is live, so there is nothing to roll back")
            standby = other(live)
            target = self._rollback_target(live)
            a = self._begin(config, DeploymentKind.ROLLBACK, target, standby, actor, reason or "manual rollback")
        except BaseException:
            self._lock.release()
            raise
        warm = self.slots.warm(standby) and self.state.slot(standby).release_id == target.id
        self._run(a, self._warm_rollback(a, schema, allow_data_loss) if warm else self._chain(a, prepare=True))
        return await self._follow(a, emit, wait)

    async def drill(self, config: Config, emit: Emit | None = None, *, actor: str | None = None,
                    max_reaction: float | None = None) -> dict[str, Any]:
        """`changeover drill` (daemon/drill.py): every rollback path rehearsed on a copy of the live
        release in the idle slot, reached by the drill's own requests only, under the one lock."""
        from changeover.daemon import drill

        release = drill.refuse(self)
        await self._claim()
        try:
            a = self._begin(config, DeploymentKind.DRILL, release, other(self.state.live_slot()), actor, "drill")
        except BaseException:
            self._lock.release()
            raise
        self._run(a, drill.Drill(self, a, max_reaction or drill.DEFAULT_MAX_REACTION).run())
        return await self._follow(a, emit, wait=True)

    async def stop_standby(self) -> dict[str, Any]:
        if self.active is not None:
            raise self.busy_error()
        async with self._lock:
            standby = other(self.state.live_slot())
            if self.state.slot(standby).state == "empty":
                return {"stopped": None}
            version = self.slots.version(standby)
            note = await self.slots.retire(standby, why="stop-standby")
            self.state.clear_timer("standby_expiry")
            return {"stopped": {"slot": standby, "version": version, **({"tunnels": note} if note else {})}}

    # -- phases ----------------------------------------------------------------------------------
    async def _prepare(self, a: Active) -> dict[str, Any]:
        steps, config, release = a.steps, a.config, a.release
        try:
            await self.telemetry.notify("deploy_started", {"version": release.version})
            if a.kind == DeploymentKind.DEPLOY:   # export and build (a rollback's release is built)
                await build_steps.prepare_release(steps, config, release, a.source, self.state)
            await self.verify.pre_deploy(steps, config, release, a.previous)
            if a.kind == DeploymentKind.DEPLOY:
                a.migrated = await self.verify.migrate_expand(steps, config, release)
            if self.state.slot(a.target).state != "empty" or self.slots.supervisor.records(a.target):
                # a standby holding only tunnels is not waited for: the step's detail says so
                await steps.run(StepKind.RETIRE, f"retire standby {a.target}", lambda: self.slots.retire(
                    a.target, why=f"making room for {release.version}"), detail=lambda note: note)
            await steps.run(StepKind.START, f"start {a.target}", lambda: self.slots.start(a.target, release),
                            detail=lambda recs: ", ".join(f"pid {r.pid} port {r.port}" for r in recs),
                            undo=self._cleanup_undo(a))
            a.session = await self.verify.verify_private(steps, config, release, a.target, a.previous, a.migrated)
        except (ChangeoverError, asyncio.CancelledError) as e:
            return await self._failed(a, e)
        self._transition(a, D.PREPARED)
        return a.result("prepared", live=a.old_version)

    async def _chain(self, a: Active, *, prepare: bool, verified: bool = False) -> dict[str, Any]:
        """From wherever `a` is to the end: prepare, switch, verify through the proxy, observe, finalise."""
        if prepare:
            await self._prepare(a)
        try:
            if a.phase == D.PREPARED:
                await self._switch(a)
            if not verified:
                await self.verify.verify_public(a.steps, a.config, a.session)
        except (ChangeoverError, asyncio.CancelledError) as e:
            return await self._failed(a, e)
        if a.config.monitor.observe > 0 and a.previous is not None and self.slots.warm(a.previous):
            a.live_event.set()  # `deploy` without --wait returns here: live, verified, being observed
        return await self._observe_and_finalise(a)

    async def _switch(self, a: Active) -> None:
        undo = Undo(StepKind.SWITCH_BACK, f"switch back to {a.previous}", lambda: self.slots.switch(
            a.previous or "", why=f"switch back: {a.version} did not pass")) \
            if a.previous is not None else None
        elapsed = await a.steps.run(StepKind.SWITCH, f"switch to {a.target}", lambda: self.slots.switch(a.target),
                                    detail=lambda s: f"{s * 1000:.1f} ms", undo=undo)
        a.switch_ms = elapsed * 1000
        self._transition(a, D.OBSERVING)
        self.telemetry.set_live(a.target)
        await self.telemetry.notify("live", {"version": a.version, "slot": a.target})
        await a.emit({"type": "live", "version": a.version, "slot": a.target, "switch_ms": a.switch_ms})

    async def _observe_and_finalise(self, a: Active, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        obs = Observation(a.config, self.state, self.slots, self.telemetry, a.release, a.target, a.previous,
                          self.verify.proxy_url())
        a.observation = obs
        try:
            verdict = await obs.run(a.steps, a.id, resume)
        except (ChangeoverError, asyncio.CancelledError) as e:
            return await self._failed(a, e)
        finally:
            a.observation = None
        if verdict is None or verdict.get("ok") or (a.stop or {}).get("kind") == "promote":
            return await self._finalise(a)
        if a.stop is not None and a.stop.get("kind") == "abort":
            reason = f"manual: {a.stop.get('reason')}" + (f" (by {a.stop['actor']})" if a.stop.get("actor") else "")
            return await self._roll_back(a, reason, verdict.get("evidence"), manual=True)
        reason = f"{verdict['reason']}: {verdict['message']}"
        refused = self.verify.incompatible_migrations(a.config, a.release)
        if refused:
            self._transition(a, D.SUCCEEDED, f"automatic rollback refused: {reason}")
            await self.telemetry.notify("rollback_refused", {"version": a.version, "reason": reason,
                                                             "evidence": verdict.get("evidence")})
            raise DeployError(f"{a.version} is live but failing ({reason}); automatic rollback was refused "
                              f"because {refused}. Decide: `changeover rollback` (code only) or fix forward.")
        return await self._roll_back(a, reason, verdict.get("evidence"), manual=False)

    async def _finalise(self, a: Active) -> dict[str, Any]:
        promoted = (a.stop or {}).get("kind") == "promote"
        self._transition(a, D.SUCCEEDED, "promoted" + (f" by {a.stop['actor']}" if a.stop and a.stop.get("actor")
                                                       else "") if promoted else None)
        self.state.event("deploy.finalised", a.target, version=a.version, promoted=promoted)
        await self.telemetry.notify("finalised", {"version": a.version, "slot": a.target})
        if a.kind == DeploymentKind.ROLLBACK:
            self.telemetry.count_rollback("manual", self.state.live_slot())
            await self.telemetry.notify("rolled_back", {"version": a.old_version, "to": a.version,
                                                        "reason": "manual", "automatic": False})
        self.schedule_standby_expiry(a.config, a.previous)
        return a.result("succeeded", switch_ms=a.switch_ms, promoted=promoted, **{"from": a.old_version})

    # -- after a restart ---------------------------------------------------------------------------
    async def resume(self, dep_id: int, where: str, config: Config) -> None:
        """Carry on a deployment the previous daemon left switched: `verify` (through the proxy, then
        observe), `observe` (the rest of its window), or `rollback` (finish switching back)."""
        dep = self.state.deployment(dep_id)
        release = self.state.release(dep.release_id) if dep is not None else None
        if dep is None or release is None or dep.slot is None:
            return
        await self._claim()
        previous = other(dep.slot)
        a = Active(dep.id, DeploymentKind(dep.kind), dep.version, dep.started_at, config, release, dep.slot,
                   previous if self.state.slot(previous).state != "empty" else None, dep.from_version,
                   StepRunner(self.state, dep.id), phase=DeploymentState(dep.state))
        a.steps.emit = a.emit
        self.apply(config)
        self.active = a
        if a.previous is not None:
            a.steps.undos.append(Undo(StepKind.SWITCH_BACK, f"switch back to {a.previous}",
                                      lambda: self.slots.switch(previous, why="switch back after a restart")))
            a.steps.undos.insert(0, self._cleanup_undo(a))
        log.info("deployment=%d resumed at %s", dep.id, where)
        self.state.event("recovery.resumed", dep.slot, deployment=dep.id, at=where)
        if where == "rollback":
            self._run(a, self._resume_rollback(a, dep.reason or "rollback"))
        elif where == "observe":
            self._run(a, self._observe_and_finalise(a, resume=dep.window))
        else:
            self._run(a, self._chain(a, prepare=False))



def app_settings(config: Config) -> dict[str, Any]:
    """The [app] settings recorded with a release (what it ran with)."""
    app = config.app
    assert app is not None
    return {"health_path": app.health_path, "instances": app.instances, "ready_timeout": app.ready_timeout,
            "stop_timeout": app.stop_timeout}
