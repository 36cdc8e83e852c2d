"""`changeover drill`: rehearse every rollback path for real, without users noticing.

The live release is started again in the idle slot as a *drill copy* (env CHANGEOVER_DRILL=1).
Only the drill's own requests reach it: they carry `X-Changeover-Drill: <token>`, a token made
for this drill, and the data plane routes them on a private route (proxy/embedded.py); the public
route is never touched. Then, each path a rollback depends on is exercised and timed:

    down migrations   the live release's down scripts exist, parse, destroy no data, and (on
                      PostgreSQL, transactional ones) run in a transaction that is rolled back
    standby start     the drill copy starts and passes private verification (a warm standby can)
    triggers          a fault on the drill route (every request fails; then latency added), with
                      the drill's own load: the monitor's Observer must fire on it, within
                      `max_reaction` seconds (a trigger disabled or too slow is a broken path)
    warm switch       the drill route moved to the live slot and back, each confirmed by who answered
    cold start        the drill copy stopped, started again cold, verified, switched on the route

It is a deployment of kind `drill` under the one-deployment lock; the drill copy is stopped at
the end whatever happened (abort included), and the report is kept in its checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from changeover.config import require_app
from changeover.daemon.model import DeploymentState, StepKind
from changeover.daemon.steps import StepFailed, Undo
from changeover.daemon.verification import database_url, migrations_enabled
from changeover.errors import ChangeoverError, DeployError
from changeover.monitor import triggers
from changeover.monitor.observer import Observer
from changeover.proxy.control import RouteControl
from changeover.state_schema import Release

if TYPE_CHECKING:
    from changeover.daemon.active import Active
    from changeover.daemon.pipeline import Pipeline

HEADER = "X-Changeover-Drill"
DEFAULT_MAX_REACTION = 30.0    # a trigger that takes longer than this to fire is "too slow"
MAX_INFLIGHT = 64              # the drill's load never piles up more than this on the drill copy
ERROR_TRIGGERS = (triggers.CONSECUTIVE_FAILURES, triggers.ERROR_RATE)


class DrillError(DeployError):
    """The drill cannot run here (the data plane, the slots); nothing was changed."""


@dataclass
class Rehearsed:
    name: str
    ok: bool | None = None        # None: not run (skipped, or an earlier path it needs failed)
    figure: str = ""
    detail: str = ""
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def refuse(pipeline: Pipeline) -> Release:
    """Why the drill cannot run now, as a DrillError; else the live release it copies."""
    proxy = pipeline.slots.proxy
    if not isinstance(proxy, RouteControl):
        raise DrillError("the drill needs [proxy] engine = embedded for now (this data plane has no private "
                         "drill route)")
    if pipeline.active is not None:
        raise pipeline.busy_error()
    st = pipeline.state
    live = st.live_slot()
    release = st.release(st.slot(live).release_id) if live else None
    if live is None or release is None:
        raise DrillError("nothing is live: deploy a release first, then rehearse its rollback")
    idle = "green" if live == "blue" else "blue"
    s = st.slot(idle)
    if s.state != "empty" or pipeline.slots.supervisor.records(idle):
        version = pipeline.slots.version(idle)
        raise DrillError(f"slot {idle} holds {version or 'a release'} ({s.state}), the standby a rollback would "
                         "use: the drill needs the idle slot. `changeover stop-standby` first, or wait until it "
                         "expires ([monitor] keep_standby)")
    return release


class Drill:
    def __init__(self, pipeline: Pipeline, a: Active, max_reaction: float = DEFAULT_MAX_REACTION) -> None:
        self.p = pipeline
        self.a = a
        self.max_reaction = max_reaction
        self.token = secrets.token_urlsafe(24)
        self.live = a.previous or ""
        self.slot = a.target
        self.paths: list[Rehearsed] = []
        route = pipeline.slots.proxy
        assert isinstance(route, RouteControl)
        self.route = route
        self.copy = dataclasses.replace(a.release, env={**a.release.env, "CHANGEOVER_DRILL": "1"})

    # -- the drill ---------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        a = self.a
        try:
            await self._migrations()
            started = await self._standby()
            if started:
                await self._triggers()
                await self._warm_switch()
                await self._cold_start()
        except asyncio.CancelledError:
            if self.p.closing:   # SIGTERM: recovery stops the half-started copy (and its route)
                raise
            await self._cleanup()
            self._record()
            self.p._transition(a, DeploymentState.ABORTED, f"drill aborted: {(a.stop or {}).get('reason', '')}")
            raise DeployError("the drill was aborted; the drill copy is stopped") from None
        except BaseException:
            await self._cleanup()
            raise
        await self._cleanup()
        self._record()
        broken = [f"{p.name}: {p.detail}" for p in self.paths if p.ok is False]
        state = DeploymentState.FAILED if broken else DeploymentState.SUCCEEDED
        self.p._transition(a, state, "; ".join(broken) if broken else None)
        return a.result(str(state), ok=not broken, report=[p.to_json() for p in self.paths])

    def _record(self) -> None:
        self.p.state.add_checks(self.a.id, [{"name": f"drill: {p.name}", "kind": "drill", "ok": p.ok is not False,
                                             "skipped": p.ok is None, "detail": f"{p.figure} {p.detail}".strip(),
                                             "data": p.to_json()} for p in self.paths])

    async def _step(self, path: Rehearsed, name: str, fn: Callable[[], Awaitable[Any]], *,
                    kind: StepKind = StepKind.DRILL, undo: Undo | None = None) -> Any:
        """A path's step; a failure marks the path broken (with the cause) instead of ending the drill."""
        t0 = time.monotonic()
        try:
            out = await self.a.steps.run(kind, name, fn, detail=lambda _: path.figure or None, undo=undo)
        except StepFailed as e:
            path.ok, path.detail = False, e.cause
            return None
        finally:
            path.seconds = round(time.monotonic() - t0, 3)
        return out

    # -- paths ---------------------------------------------------------------------------------------
    async def _migrations(self) -> None:
        from changeover.migrations.rehearse import rehearse

        path = Rehearsed("down migrations")
        self.paths.append(path)
        config, release = self.a.config, self.a.release
        try:
            enabled = migrations_enabled(config, release)
        except ChangeoverError as e:
            path.ok, path.detail = False, str(e)
            return
        if not enabled:
            path.figure = "no migrations configured"
            await self.a.steps.note("drill: down migrations", path.figure)
            return

        async def go() -> None:
            r = await asyncio.to_thread(rehearse, config, release.version, release_dir=release.path,
                                        database_url=database_url(config, release))
            path.figure = r.summary() if r.ok else f"{len(r.checked)} checked"
            if not r.ok:
                raise DeployError(r.summary())
            path.ok = True

        await self._step(path, "drill: down migrations", go)

    async def _standby(self) -> bool:
        path = Rehearsed("standby start")
        self.paths.append(path)

        async def go() -> None:
            t0 = time.monotonic()
            await self._start()
            path.figure = f"started and verified in {time.monotonic() - t0:.1f}s"
            path.ok = True

        await self._step(path, f"drill: start {self.a.version} in {self.slot} (drill copy)", go, kind=StepKind.START,
                         undo=Undo(StepKind.CLEANUP, f"stop the drill copy in {self.slot}", self._stop))
        return path.ok is True

    async def _start(self) -> None:
        await self.p.slots.start(self.slot, self.copy)
        # its own metrics label: counted apart from the release's real traffic
        await self.p.slots.proxy.set_version(self.slot, f"{self.a.version}+drill")
        config = self.a.config
        await self.p.verify.verify_private(self.a.steps, config, self.a.release, self.slot, None, False)
        await self.route.set_route("drill", self.slot, self.token)
        await self._answered_by(self.slot)

    async def _stop(self) -> None:
        await self.route.set_route("drill", None)
        await self.p.slots.retire(self.slot, drain=False, why="drill copy stopped")

    async def _triggers(self) -> None:
        cfg = self.a.config.monitor
        errors, latency = Rehearsed("trigger: errors"), Rehearsed("trigger: latency")
        self.paths += [errors, latency]
        if cfg.observe <= 0:
            for p in (errors, latency):
                p.ok, p.detail = False, "[monitor] observe = 0: no trigger watches a deploy, nothing rolls back"
            return
        load = Load(self.p.verify.proxy_url(), require_app(self.a.config).health_path, self.token, cfg)
        load.start()
        try:
            baseline = await self._step(latency, "drill: baseline of the drill copy", lambda: self._baseline(load))
            await self._fault(errors, {"status": 500}, None, ERROR_TRIGGERS)
            if baseline is None:
                return
            await self._fresh_window("latency")
            limit = triggers.latency_limit(baseline, cfg) or cfg.latency_min_increase
            delay = round(min(10.0, max(0.05, 3 * limit)), 3)
            await self._fault(latency, {"delay": delay}, baseline, (triggers.LATENCY,))
        finally:
            await load.stop()
            await self.route.set_route("drill", self.slot, self.token)

    async def _baseline(self, load: Load) -> triggers.Baseline:
        """The drill copy's own healthy latency, as the latency trigger's reference."""
        cfg = self.a.config.monitor
        need = max(cfg.latency_min_samples * 2, cfg.min_requests)
        seconds = max(cfg.latency_window * cfg.latency_windows, 2.0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds or load.done < need:
            if time.monotonic() - t0 > self.max_reaction + seconds:
                raise DeployError(f"the drill's load got {load.done} answers in {time.monotonic() - t0:.0f}s "
                                  f"(the latency trigger needs {need})")
            await asyncio.sleep(0.2)
        await self.p.telemetry.pull()
        window = dataclasses.replace(cfg, baseline=min(cfg.history, time.monotonic() - t0))
        return triggers.make_baseline(self.p.telemetry.recorder, self.slot, window)

    async def _fresh_window(self, phase: str) -> None:
        """A new metrics label for the drill copy: the next trigger judges only what follows (the
        recorder starts a relabelled slot empty), not the failures of the phase before."""
        label = f"{self.a.version}+drill-{phase}"
        await self.p.slots.proxy.set_version(self.slot, label)
        for _ in range(100):
            await self.p.telemetry.pull()
            if self.p.telemetry.recorder.version(self.slot) == label:
                return
            await asyncio.sleep(0.05)

    async def _fault(self, path: Rehearsed, fault: dict[str, float], baseline: triggers.Baseline | None,
                     expect: tuple[str, ...]) -> None:
        cfg = dataclasses.replace(self.a.config.monitor, observe=self.max_reaction)
        what = "every request fails (500)" if "status" in fault else f"+{fault['delay'] * 1000:.0f} ms"

        async def go() -> None:
            await self.route.set_route("drill", self.slot, self.token, fault)
            observer = Observer(cfg, self.p.telemetry.recorder, self.slot, baseline)
            try:
                verdict = await observer.run()
            finally:
                await self.route.set_route("drill", self.slot, self.token)
            if verdict.ok:
                raise DeployError(f"{what}: no trigger fired within {self.max_reaction:g}s (disabled or too slow?)")
            path.figure = f"{verdict.reason} fired in {verdict.elapsed:.1f}s"
            if verdict.reason not in expect:
                raise DeployError(f"{what}: {verdict.reason} fired, not {' or '.join(expect)}: {verdict.message}")
            path.ok = True
            path.detail = verdict.message

        await self._step(path, f"drill: fault on the drill copy ({what})", go)

    async def _warm_switch(self) -> None:
        path = Rehearsed("warm switch")
        self.paths.append(path)

        async def go() -> None:
            took = []
            for slot in (self.live, self.slot):
                t0 = time.perf_counter()
                await self.route.set_route("drill", slot, self.token)
                took.append((time.perf_counter() - t0) * 1000)
                await self._answered_by(slot)
            path.figure = f"{max(took):.1f} ms ({self.slot} -> {self.live} -> {self.slot})"
            path.ok = True

        await self._step(path, "drill: warm switch on the drill route", go)

    async def _cold_start(self) -> None:
        path = Rehearsed("cold start")
        self.paths.append(path)

        async def go() -> None:
            await self.route.set_route("drill", self.live, self.token)
            await self.p.slots.retire(self.slot, drain=False, why="drill: cold start")
            t0 = time.monotonic()
            await self._start()
            path.figure = f"started, verified and switched in {time.monotonic() - t0:.1f}s"
            path.ok = True

        await self._step(path, "drill: cold start of the drill copy", go)

    async def _cleanup(self) -> None:
        try:
            await self.a.steps.unwind()
            await self._stop()
        except ChangeoverError as e:
            self.paths.append(Rehearsed("cleanup", False, detail=f"the drill copy may still run: {e}"))

    async def _answered_by(self, slot: str) -> None:
        """One request on the drill route: the data plane names the slot that answered it."""
        async with httpx.AsyncClient(timeout=10, verify=False) as client:   # our own proxy, maybe over HTTPS
            r = await client.get(self.p.verify.proxy_url() + require_app(self.a.config).health_path,
                                 headers={HEADER: self.token})
        got = r.headers.get("x-changeover-slot")
        if got != slot or r.status_code >= 500:
            raise DeployError(f"a request on the drill route was answered by {got or 'nobody'} "
                              f"(HTTP {r.status_code}), expected {slot}")


class Load:
    """The drill's own requests, open loop at the rate the latency trigger needs to judge."""

    def __init__(self, base: str, path: str, token: str, cfg: Any) -> None:
        self.url = base + path
        self.token = token
        self.rate = max(10.0, 2 * cfg.latency_min_samples / cfg.latency_window, cfg.min_requests / cfg.window * 2)
        self.done = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=MAX_INFLIGHT, max_keepalive_connections=MAX_INFLIGHT)
        async with httpx.AsyncClient(timeout=30, limits=limits, verify=False) as client:   # our own proxy
            period = 1.0 / self.rate
            nxt = time.monotonic()
            while True:
                if len(self._inflight) < MAX_INFLIGHT:
                    t = asyncio.get_running_loop().create_task(self._one(client))
                    self._inflight.add(t)
                    t.add_done_callback(self._inflight.discard)
                nxt += period
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def _one(self, client: httpx.AsyncClient) -> None:
        try:
            await client.get(self.url, headers={HEADER: self.token})
        except httpx.HTTPError:
            pass                     # the data plane recorded it; the triggers judge it
        self.done += 1

    async def stop(self) -> None:
        for t in [*([self._task] if self._task else []), *self._inflight]:
            t.cancel()
        await asyncio.gather(*([self._task] if self._task else []), *self._inflight, return_exceptions=True)
