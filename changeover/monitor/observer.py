"""The observation window after a switch: judge the new live slot until it passes or a trigger fires.

Probe timeouts use `asyncio.timeout()`, not `wait_for()`: on Python 3.11 `wait_for` drops a
cancellation that races with its inner call finishing, which would leave a probe loop running
after the verdict. Every loop also stops by itself once a verdict exists.

The daemon builds an `Observer` right after switching traffic and awaits `run()`. Traffic triggers
(consecutive failures, error rate, latency) are cheap sums over the recorder's buckets and run
every `interval` in one loop; the daemon-supplied probes (database, health, critical checks,
crash counts, synthetic requests) each run in their own task so a hanging probe never delays the
traffic judgement. The first trigger wins; `cancel()` ends the window from outside (manual
rollback). Times come from `clock`, the same clock the recorder uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from changeover.monitor.buckets import NBUCKETS
from changeover.monitor.compare import RankTest, signed_rank
from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Clock, Recorder, route_runs, route_windows
from changeover.monitor.stats import WindowStats, quantile
from changeover.monitor.triggers import (
    CANCELLED,
    CRITICAL,
    DATABASE,
    Baseline,
    Fired,
    Streaks,
    check_consecutive,
    check_crash_loop,
    check_error_rate,
    check_probes,
    check_route_consecutive,
    check_route_error_rate,
    judge_latency,
    z_corrected,
)

log = logging.getLogger("changeover.monitor")

ProbeFn = Callable[[], Awaitable[tuple[bool, str]]]
CriticalFn = Callable[[], Awaitable[list[tuple[str, bool, str]]]]
CrashesFn = Callable[[float], Awaitable[int]]
SyntheticFn = Callable[[], Awaitable[None]]
PairedFn = Callable[[], Awaitable[tuple[float, float] | None]]

MAX_SYNTHETIC_INFLIGHT = 4  # a slow app must not pile up smoke requests
LONG_WINDOW_FACTOR = 6      # the error rate is also judged over 6 x window (capped by history) ...
LONG_WINDOW_EVERY = 1.0     # ... once a second: it is a slow-fault path, not the fast one
MIN_PAIRS = 20              # paired probes (within the latency windows' span) for the rank test
MAX_PAIRS = 600             # the most recent pairs kept


@dataclass
class Probes:
    """Async callables the daemon supplies; any may be None (that trigger is then off).

    db_probe() -> (ok, detail): connect to the release's database.
    health_probe() -> (ok, detail): the new slot's health endpoint, ok False when its "db" is down.
    critical() -> [(name, ok, detail)]: the [checks] critical services, re-run.
    crashes(since) -> int: instance crashes of the new slot since `since` (observer clock).
    synthetic() -> None: one smoke request through the proxy to the live slot.
    paired() -> (new_seconds, old_seconds) | None: the same probe request sent to an instance of
        each slot at the same moment; None when either failed (the error triggers judge those).
    """

    db_probe: ProbeFn | None = None
    health_probe: ProbeFn | None = None
    critical: CriticalFn | None = None
    crashes: CrashesFn | None = None
    synthetic: SyntheticFn | None = None
    paired: PairedFn | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0       # seconds from the start of the window to the verdict

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "message": self.message,
                "evidence": self.evidence, "elapsed": round(self.elapsed, 3)}


class Observer:
    def __init__(self, cfg: MonitorConfig, metrics: Recorder, live_slot: str,
                 baseline: WindowStats | Baseline | None, probes: Probes | None = None,
                 clock: Clock = time.monotonic, *, elapsed: float = 0.0) -> None:
        """`elapsed`: seconds of this window already observed (a restarted daemon resuming it):
        the window started that long ago, on this clock, so it ends that much sooner, windows
        reach back to the original switch, and the verdict's `elapsed` counts from it."""
        self.cfg = cfg
        self.metrics = metrics
        self.slot = live_slot
        self.baseline = Baseline.from_stats(baseline) if isinstance(baseline, WindowStats) else baseline
        self.probes = probes or Probes()
        self.clock = clock
        self.start = clock() - max(0.0, elapsed)
        self.verdict: Verdict | None = None
        self.last: dict[str, Any] = {}            # latest numbers, for `changeover status`
        self._db = Streaks()
        self._critical = Streaks()
        self._synthetic_sent: deque[float] = deque()
        self._synthetic_tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[Verdict] | None = None
        self._stopped = False   # run() is over: every loop ends, even one whose cancel a timeout swallowed
        self._next_long = self.start
        # Each disjoint window of an observation is another chance for chance to fire: the
        # error-rate bound is corrected for that many looks (and, per route, for the routes).
        self._looks = max(1, math.ceil(cfg.observe / cfg.window))
        self._z = z_corrected(cfg.confidence, self._looks)
        self._route_zs: dict[int, float] = {}
        span = cfg.latency_windows * (max(1, round(cfg.latency_window)) + 1)
        self._probe_alpha = (1 - cfg.confidence) / max(1, math.ceil(cfg.observe / span))
        paired = self.probes.paired is not None and cfg.paired_probes > 0
        self._probe_wait = self.start + (2 * MIN_PAIRS / cfg.paired_probes if paired else 0.0)
        self._pairs: deque[tuple[float, float, float]] = deque(maxlen=MAX_PAIRS)
        # A route that already failed under the old release is not this release's regression.
        self._failing_before = {r.route for r in (self.baseline.routes if self.baseline else ())
                                if r.requests >= cfg.min_requests and r.errors > cfg.error_rate * r.requests}
        if self._failing_before:
            self.last["routes_failing_before"] = sorted(self._failing_before)

    # -- control ------------------------------------------------------------------------------
    def cancel(self, reason: str = CANCELLED, evidence: dict[str, Any] | None = None) -> None:
        """End the window now with ok=False (a manual rollback); run() returns that verdict."""
        self._finish(Verdict(False, reason, f"observation stopped: {reason}", evidence or {},
                             self.clock() - self.start))

    def add_pair(self, new: float, old: float) -> None:
        """One paired probe: seconds taken by the new slot and by the old one, same moment."""
        self._pairs.append((self.clock(), float(new), float(old)))

    def status(self) -> dict[str, Any]:
        elapsed = self.clock() - self.start
        return {"slot": self.slot, "elapsed": round(elapsed, 3),
                "remaining": round(max(0.0, self.cfg.observe - elapsed), 3),
                "verdict": self.verdict.to_dict() if self.verdict else None,
                "baseline": self.baseline.summary() if self.baseline else None, **self.last}

    def _finish(self, v: Verdict) -> None:
        if self.verdict is not None:
            return  # the first verdict wins
        self.verdict = v
        if self._done is not None and not self._done.done():
            self._done.set_result(v)

    def _fire(self, f: Fired) -> None:
        elapsed = self.clock() - self.start
        evidence = {**f.evidence, "slot": self.slot, "version": self.metrics.version(self.slot),
                    "observed_seconds": round(elapsed, 3)}
        self._finish(Verdict(False, f.reason, f.message, evidence, elapsed))

    # -- the traffic judgement (synchronous, cheap) ------------------------------------------
    def evaluate(self) -> Fired | None:
        """One evaluation of the traffic triggers. Called every `interval` by run()."""
        cfg, m = self.cfg, self.metrics
        fired = check_consecutive(m.consecutive_failures(self.slot), cfg)
        if fired:
            return fired
        w = m.window(self.slot, cfg.window, since=self.start)
        self.last = {**self.last, "requests": w.requests, "errors": w.errors,
                     "error_rate": round(w.error_rate, 5), "rps": round(w.rps, 2), "p95": w.p95}
        fired = check_error_rate(w, cfg, self._z) or self._routes_fast()
        now = self.clock()
        slow_pace = not fired and now >= self._next_long
        if slow_pace:
            # A steady moderate error rate (10 %) at low traffic needs more requests than one
            # window holds to be judged with confidence: also judge a longer one, once a second.
            # Route latency and the long route windows are judged at the same pace.
            self._next_long = now + LONG_WINDOW_EVERY
            long = min(cfg.window * LONG_WINDOW_FACTOR, cfg.history)
            fired = check_error_rate(m.window(self.slot, long, since=self.start), cfg, self._z) \
                or self._route_errors(long)
        if fired or self.baseline is None:
            return fired
        # the slot first: a slowdown of everything is the release's, not one route's
        fired = self._slot_latency()
        if not fired and slow_pace:
            fired = self._route_latency()
        return fired

    def _slot_latency(self) -> Fired | None:
        assert self.baseline is not None
        cfg = self.cfg
        windows = self._latency_windows()
        if windows is None:
            return None
        secs = sum(w.seconds for w, _ in windows)
        rps = sum(w.requests for w, _ in windows) / max(secs, 1.0)
        lw = [(lw.requests, h, lw.seconds) for lw, h in windows]
        probes = self._rank()
        fired, info = judge_latency(lw, self.baseline, cfg, self._z, rps=rps, probes=probes,
                                    probe_alpha=self._probe_alpha)
        if fired and probes is None and self.clock() < self._probe_wait:
            # the paired probes may yet show a shared slowdown: give them their first samples
            info["waiting"] = "for the paired probes"
            fired = None
        self.last["latency"] = info
        return fired

    def _latency_windows(self) -> list[tuple[WindowStats, list[int]]] | None:
        cfg = self.cfg
        n = max(1, round(cfg.latency_window))
        windows = []
        for k in range(cfg.latency_windows):
            lw = self.metrics.window_hist(self.slot, n, since=self.start, offset=k * (n + 1))
            if lw[0].requests < cfg.latency_min_samples:
                return None  # not enough to judge: skip the remaining (older) windows
            windows.append(lw)
        return windows

    def _route_z(self, judged: int) -> float:
        z = self._route_zs.get(judged)
        if z is None:
            z = self._route_zs[judged] = z_corrected(self.cfg.confidence, self._looks * max(1, judged))
        return z

    def _routes_fast(self) -> Fired | None:
        """Per route, every interval: its run of failures, and its error rate over `window`."""
        cfg = self.cfg
        for route, run in route_runs(self.metrics, self.slot).items():
            if route in self._failing_before:
                continue
            fired = check_route_consecutive(route, run, cfg)
            if fired:
                return fired
        return self._route_errors(cfg.window)

    def _route_errors(self, seconds: float) -> Fired | None:
        rows = route_windows(self.metrics, self.slot, seconds, since=self.start, latency=False)
        judged = [r for r in rows if r[1] >= self.cfg.min_requests and r[0] not in self._failing_before]
        if len(rows) < 2:
            return None  # one route is the slot itself: the slot's own triggers judge it
        z = self._route_z(len(judged))
        span = min(seconds, self.clock() - self.start)
        for route, req, err, _ in judged:
            fired = check_route_error_rate(route, req, err, span, self.cfg, z)
            if fired:
                return fired
        return None

    def _route_latency(self) -> Fired | None:
        """Per route, once a second: latency against the route's own baseline at the slot's load."""
        if self.baseline is None or not self.baseline.routes:
            return None
        cfg = self.cfg
        n = max(1, round(cfg.latency_window))
        per: dict[str, list[tuple[int, list[int], float]]] = {}
        slot_req, slot_secs = 0, 0.0
        for k in range(cfg.latency_windows):
            off = k * (n + 1)
            w = self.metrics.window(self.slot, n, since=self.start, offset=off)
            slot_req, slot_secs = slot_req + w.requests, slot_secs + w.seconds
            for route, req, _, hist in route_windows(self.metrics, self.slot, n, since=self.start, offset=off):
                per.setdefault(route, []).append((req, hist, w.seconds))
        rps = slot_req / max(slot_secs, 1.0)
        judged = {r: ws for r, ws in per.items()
                  if len(ws) == cfg.latency_windows and min(x[0] for x in ws) >= cfg.latency_min_samples}
        if len(per) < 2:
            return None
        z = self._route_z(len(judged))
        slot_ref = self.last.get("latency", {}).get("baseline", {}).get("p95_ms")
        for route, ws in judged.items():
            fired, _ = judge_latency(ws, self.baseline, cfg, z, rps=rps, route=route,
                                     shared=self._shared(per, route, slot_ref))
            if fired:
                return fired
        return None

    def _shared(self, per: dict[str, list[tuple[int, list[int], float]]], route: str,
                slot_ref_ms: float | None) -> float:
        """How much slower than the slot's baseline the slot's other routes are now (>= 1): the
        part of a route's slowdown it shares with everything else."""
        if not slot_ref_ms:
            return 1.0
        ratios = []
        for k in range(self.cfg.latency_windows):
            hist = [0] * NBUCKETS
            n = 0
            for r, ws in per.items():
                if r != route and len(ws) > k:
                    n += ws[k][0]
                    hist = [a + b for a, b in zip(hist, ws[k][1], strict=True)]
            p95 = quantile(hist, n, 0.95) if n >= self.cfg.latency_min_samples else None
            if p95 is None:
                return 1.0
            ratios.append(p95 / (slot_ref_ms / 1000))
        return max(1.0, min(ratios))

    def _rank(self) -> RankTest | None:
        """The paired probes of the span the latency windows cover: new slot vs old slot."""
        span = self.cfg.latency_windows * (max(1, round(self.cfg.latency_window)) + 1)
        since = self.clock() - span
        recent = [(a, b) for t, a, b in self._pairs if t >= since]
        if len(recent) < MIN_PAIRS:
            return None
        test = signed_rank(recent)
        if test is not None:
            self.last["paired_probes"] = test.to_dict()
        return test

    # -- the window ---------------------------------------------------------------------------
    async def run(self) -> Verdict:
        """Observe until `observe` has passed (ok=True) or a trigger fires (ok=False)."""
        loop = asyncio.get_running_loop()
        if self.verdict is not None:
            return self.verdict
        self._done = loop.create_future()
        p = self.probes
        loops: list[Callable[[], Coroutine[Any, Any, None]]] = [self._traffic_loop]
        if p.db_probe or p.health_probe:
            loops.append(self._db_loop)
        if p.critical:
            loops.append(self._critical_loop)
        if p.crashes:
            loops.append(self._crash_loop)
        if p.synthetic and self.cfg.synthetic_rate > 0:
            loops.append(self._synthetic_loop)
        if p.paired and self.cfg.paired_probes > 0:
            loops.append(self._paired_loop)
        tasks: list[asyncio.Task[None]] = [loop.create_task(fn()) for fn in loops]
        for t in tasks:
            t.add_done_callback(self._task_done)
        try:
            return await self._done
        finally:
            self._stopped = True
            for t in [*tasks, *self._synthetic_tasks]:
                t.cancel()
            await asyncio.gather(*tasks, *self._synthetic_tasks, return_exceptions=True)

    def _task_done(self, t: asyncio.Task[None]) -> None:
        # A bug in a loop must surface in run(), not leave the deploy waiting forever.
        if not t.cancelled() and t.exception() is not None and self._done and not self._done.done():
            self._done.set_exception(t.exception())  # type: ignore[arg-type]

    async def _traffic_loop(self) -> None:
        cfg = self.cfg
        while self.verdict is None and not self._stopped:
            fired = self.evaluate()
            if fired:
                self._fire(fired)
                return
            elapsed = self.clock() - self.start
            if elapsed >= cfg.observe:
                self._finish(Verdict(True, "", f"observed {cfg.observe:g}s without a trigger",
                                     dict(self.last), elapsed))
                return
            await asyncio.sleep(min(cfg.interval, cfg.observe - elapsed))

    async def _call(self, fn: ProbeFn) -> tuple[bool, str]:
        """A probe with a timeout; an exception or timeout is a failure, with what went wrong."""
        try:
            async with asyncio.timeout(self.cfg.probe_timeout):
                ok, detail = await fn()
            return bool(ok), str(detail)
        except TimeoutError:
            return False, f"no answer within {self.cfg.probe_timeout:g}s"
        except Exception as e:
            return False, f"{type(e).__name__}: {e}"

    async def _db_loop(self) -> None:
        p = self.probes
        named = [(n, fn) for n, fn in (("db_probe", p.db_probe), ("health_probe", p.health_probe)) if fn]
        while self.verdict is None and not self._stopped:
            results = await asyncio.gather(*(self._call(fn) for _, fn in named))
            for (name, _), (ok, detail) in zip(named, results, strict=True):
                self._db.update(name, ok, detail)
            fired = check_probes(self._db, [n for n, _ in named], DATABASE, self.cfg)
            if fired:
                self._fire(fired)
                return
            await asyncio.sleep(self.cfg.db_probe_interval)

    async def _critical_loop(self) -> None:
        fn = self.probes.critical
        assert fn is not None
        while self.verdict is None and not self._stopped:
            names: list[str] = []
            try:
                async with asyncio.timeout(self.cfg.probe_timeout):
                    results = await fn()
                for name, ok, detail in results:
                    names.append(name)
                    self._critical.update(name, ok, detail)
            except Exception as e:
                detail = (f"no answer within {self.cfg.probe_timeout:g}s" if isinstance(e, TimeoutError)
                          else f"{type(e).__name__}: {e}")
                names.append("critical checks")
                self._critical.update("critical checks", False, detail)
            fired = check_probes(self._critical, names, CRITICAL, self.cfg)
            if fired:
                self._fire(fired)
                return
            await asyncio.sleep(self.cfg.critical_interval)

    async def _crash_loop(self) -> None:
        fn = self.probes.crashes
        assert fn is not None
        while self.verdict is None and not self._stopped:
            now = self.clock()
            since = max(self.start, now - self.cfg.crash_loop_within)
            try:
                async with asyncio.timeout(self.cfg.probe_timeout):
                    n = await fn(since)
            except Exception as e:
                log.warning("crash count unavailable: %s", e)
                n = 0
            fired = check_crash_loop(n, now - since, self.cfg)
            if fired:
                self._fire(fired)
                return
            await asyncio.sleep(self.cfg.interval)

    async def _synthetic_loop(self) -> None:
        """While real traffic is below min_requests in the window, send smoke requests at
        `synthetic_rate` so the triggers have samples to judge (the proxy records them)."""
        fn = self.probes.synthetic
        assert fn is not None
        period = 1.0 / self.cfg.synthetic_rate
        sent = self._synthetic_sent
        while self.verdict is None and not self._stopped:
            now = self.clock()
            while sent and sent[0] < now - self.cfg.window:
                sent.popleft()
            w = self.metrics.window(self.slot, self.cfg.window, since=self.start)
            if w.requests - len(sent) < self.cfg.min_requests and \
                    len(self._synthetic_tasks) < MAX_SYNTHETIC_INFLIGHT:
                sent.append(now)
                t = asyncio.get_running_loop().create_task(self._one_synthetic(fn))
                self._synthetic_tasks.add(t)
                t.add_done_callback(self._synthetic_tasks.discard)
            await asyncio.sleep(period)

    async def _paired_loop(self) -> None:
        fn = self.probes.paired
        assert fn is not None
        while self.verdict is None and not self._stopped:
            try:
                async with asyncio.timeout(self.cfg.probe_timeout):
                    pair = await fn()
            except Exception as e:   # a probe that cannot run is no evidence either way
                log.debug("paired probe failed: %s", e)
                pair = None
            if pair is not None:
                self.add_pair(*pair)
            await asyncio.sleep(1.0 / self.cfg.paired_probes)

    async def _one_synthetic(self, fn: SyntheticFn) -> None:
        with contextlib.suppress(Exception):  # its outcome is judged through the recorder
            async with asyncio.timeout(self.cfg.probe_timeout):
                await fn()
