"""The one active deployment: its record (`Active`) and the base of the pipeline that claims it,
runs each phase as a task of its own, streams it to callers, and does background work (retiring a
slot, the standby's expiry) under the same lock. At most one deployment is active; a second is
refused, not queued."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from changeover.checks.flows import SessionProbe
from changeover.config import Config, require_app
from changeover.daemon import builds
from changeover.daemon.model import DeploymentKind, DeploymentState
from changeover.daemon.observation import Observation
from changeover.daemon.slots import SlotManager
from changeover.daemon.steps import StepRunner
from changeover.daemon.telemetry import Telemetry
from changeover.daemon.verification import Verification
from changeover.errors import ChangeoverError, DeployInProgress
from changeover.redact import redact_json
from changeover.rpc import Emit
from changeover.state import State
from changeover.state_schema import Release

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


class Deployments:
    """The active deployment's bookkeeping, shared by the phase verbs (pipeline.py) and the way back
    (unwind.py)."""

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
