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
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover.checks.flows import SessionProbe
from changeover.config import Config, release_env, require_app
from changeover.daemon import builds
from changeover.daemon.model import DeploymentKind, DeploymentState, SlotState, StepKind, other
from changeover.daemon.observation import Observation
from changeover.daemon.slots import SlotManager
from changeover.daemon.steps import StepFailed, StepRunner, Undo
from changeover.daemon.telemetry import Telemetry
from changeover.daemon.verification import Verification
from changeover.errors import (
    ChangeoverError,
    DeployError,
    DeployInProgress,
    RollbackError,
    StateWriteError,
    UsageError,
)
from changeover.redact import redact_json
from changeover.rpc import Emit
from changeover.state import Release, State

log = logging.getLogger("changeover.deploy")
D = DeploymentState


@dataclass
class Active:
    """The deployment in progress (at most one)."""

    id: int
    kind: DeploymentKind
    version: str
    started: float
    config: Config
    release: Release
    target: str                     # the slot the release goes into
    previous: str | None            # the slot that was live before (the rollback target)
    old_version: str | None
    steps: StepRunner
    phase: DeploymentState = D.RUNNING
    session: SessionProbe | None = None
    migrated: bool = False
    switch_ms: float = 0.0
    stop: dict[str, Any] | None = None        # abort / manual rollback / promote asked from outside
    observation: Observation | None = None
    outcome: dict[str, Any] | None = None     # a rollback's result, for the `rollback`/`abort` caller
    task: asyncio.Task[Any] | None = None
    live_event: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[dict[str, Any]] | None = None
    listeners: list[Emit] = field(default_factory=list)
    source: builds.Source | None = None       # deploy --git/--archive: exported by the prepare phase

    async def emit(self, event: dict[str, Any]) -> None:
        event = redact_json(event)   # secrets of any release env, by value (changeover.redact)
        for fn in list(self.listeners):
            try:
                await fn(event)
            except Exception:  # a CLI that went away must not stop the deploy
                self.listeners.remove(fn)

    def result(self, state: str, **extra: Any) -> dict[str, Any]:
        return {"state": state, "deployment": self.id, "kind": str(self.kind), "version": self.version,
                "slot": self.target, **extra}


class Pipeline:
    def __init__(self, state: State, slots: SlotManager, verification: Verification, telemetry: Telemetry) -> None:
        self.state = state
        self.slots = slots
        self.verify = verification
        self.telemetry = telemetry
        self.active: Active | None = None
        self._lock = asyncio.Lock()           # held by the active deployment and by background retires
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self.closing = False    # the daemon stops: leave deployments as they are for the next one

    # -- the active deployment -------------------------------------------------------------------
    def busy_error(self) -> DeployInProgress:
        a = self.active
        assert a is not None
        since = time.strftime("%H:%M:%S", time.localtime(a.started))
        what = {D.OBSERVING: "is live and being observed", D.PREPARED: "is prepared, waiting for `switch`",
                D.ROLLING_BACK: "is being rolled back"}.get(a.phase, "is running")
        return DeployInProgress(f"{a.kind} of {a.version} (deployment #{a.id}) {what} since {since}; "
                                "wait for it, `changeover promote` to end its window, or `changeover rollback`/"
                                "`abort` to stop it")

    def _transition(self, a: Active, new: DeploymentState, reason: str | None = None) -> None:
        self.state.transition_deployment(a.id, new, reason)
        a.phase = new
        self.telemetry.set_deploy_state(str(new) if not new.finished else "idle")

    async def _claim(self) -> None:
        """Claim the one deployment at once (a second deploy is refused, not queued), then wait for
        the lock, which only background work (retiring a slot) holds, and briefly."""
        if self.active is not None:
            raise self.busy_error()
        await self._lock.acquire()
        if self.active is not None:  # claimed while we waited
            self._lock.release()
            raise self.busy_error()

    def _begin(self, config: Config, kind: DeploymentKind, release: Release, target: str,
               actor: str | None, reason: str | None = None) -> Active:
        previous = self.state.live_slot()
        old_version = self.slots.version(previous)
        dep = self.state.begin_deployment(str(kind), release.version, release.id, old_version, target,
                                          actor=actor, reason=reason)
        self.apply(config)
        a = Active(dep, kind, release.version, time.time(), config, release, target, previous, old_version,
                   StepRunner(self.state, dep))
        a.steps.emit = a.emit
        self.active = a
        return a

    def apply(self, config: Config) -> None:
        """The settings a deployment read become the daemon's for what it starts and watches."""
        self.slots.config = config
        self.slots.supervisor.app = require_app(config)
        self.telemetry.configure(config.monitor)

    def _end(self, a: Active) -> None:
        if self.active is a:
            self.active = None
            if self._lock.locked():
                self._lock.release()
        a.live_event.set()

    def _run(self, a: Active, coro: Coroutine[Any, Any, dict[str, Any]], *, final: bool = True) -> None:
        """Run a phase as a task of its own; its outcome lands in `a.done`. With final=False the
        deployment stays active after the phase succeeds (prepare of `deploy --no-switch`)."""
        loop = asyncio.get_running_loop()
        a.live_event.clear()
        a.done = loop.create_future()
        # Without --wait nobody may await the outcome; it is in the history, not an asyncio warning.
        a.done.add_done_callback(lambda f: None if f.cancelled() else f.exception())

        async def runner() -> None:
            assert a.done is not None
            ended = True
            try:
                result = await coro
                ended = final or a.phase.finished
                a.done.set_result(result)
            except BaseException as e:
                a.done.set_exception(e)
                if not isinstance(e, ChangeoverError | asyncio.CancelledError):
                    log.exception("pipeline crashed")
            finally:
                a.task = None
                if ended:
                    self._end(a)
                else:
                    a.live_event.set()

        a.task = loop.create_task(runner(), name=f"deployment-{a.id}")
        self._tasks.add(a.task)
        a.task.add_done_callback(self._tasks.discard)

    async def _follow(self, a: Active, emit: Emit | None, wait: bool) -> dict[str, Any]:
        """Stream a running phase to the caller until it is live (or, with wait, until it ends)."""
        assert a.done is not None
        if emit is not None:
            a.listeners.append(emit)
        try:
            if wait:
                return await asyncio.shield(a.done)
            live: asyncio.Future[Any] = asyncio.ensure_future(a.live_event.wait())
            await asyncio.wait([live, a.done], return_when=asyncio.FIRST_COMPLETED)
            live.cancel()
            if a.done.done():
                return a.done.result()
            return a.result("live", observing=True)
        finally:
            if emit is not None and emit in a.listeners:
                a.listeners.remove(emit)

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
                await builds.prepare_release(steps, config, release, a.source, self.state)
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

    # -- standby expiry ----------------------------------------------------------------------------
    def schedule_standby_expiry(self, config: Config, slot: str | None) -> None:
        """Retire the standby `keep_standby` after a deploy; the deadline lives in the state, so a
        restarted daemon keeps it."""
        keep = config.monitor.keep_standby
        if slot is None or keep <= 0:
            self.state.clear_timer("standby_expiry")
            self.arm_expiry()
            return
        self.state.set_timer("standby_expiry", time.time() + keep, slot=slot,
                             release_id=self.state.slot(slot).release_id, keep=keep)
        self.arm_expiry()

    def arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        timer = self.state.timer("standby_expiry")
        if timer is None:
            return
        due, data = timer
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, due - time.time()), self._expire, data)

    def _expire(self, data: dict[str, Any]) -> None:
        self._expiry = None
        if self.active is not None:   # a deploy decides about the standby itself; look again later
            self._expiry = asyncio.get_running_loop().call_later(1.0, self._expire, data)
            return
        self.state.clear_timer("standby_expiry")
        slot = str(data.get("slot"))
        s = self.state.slot(slot)
        if s.state == "standby" and s.release_id == data.get("release_id"):
            log.info("slot=%s standby kept %.0fs: retiring it", slot, float(data.get("keep", 0)))
            self.spawn(self._retire_quietly(slot, f"standby kept for {float(data.get('keep', 0)):g}s"))

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold off deployments while the daemon does something of its own (a proxy handover)."""
        if self.active is not None:
            raise self.busy_error()
        async with self._lock:
            yield

    async def _retire_quietly(self, slot: str, why: str) -> None:
        try:
            async with self._lock:
                if self.state.live_slot() != slot:
                    await self.slots.retire(slot, why=why)
        except ChangeoverError as e:
            log.warning("retiring %s failed: %s", slot, e)

    def spawn(self, coro: Awaitable[Any]) -> None:
        async def wrap() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(wrap())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self.closing = True
        if self._expiry is not None:
            self._expiry.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def app_settings(config: Config) -> dict[str, Any]:
    """The [app] settings recorded with a release (what it ran with)."""
    app = config.app
    assert app is not None
    return {"health_path": app.health_path, "instances": app.instances, "ready_timeout": app.ready_timeout,
            "stop_timeout": app.stop_timeout}
