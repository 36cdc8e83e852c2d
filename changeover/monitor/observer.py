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

The traffic judgement itself (what `evaluate()` sums and compares) is judge.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from changeover.monitor.config import MonitorConfig
from changeover.monitor.judge import TrafficJudge
from changeover.monitor.metrics import Clock, Recorder
from changeover.monitor.stats import WindowStats
from changeover.monitor.triggers import (
    CANCELLED,
    CRITICAL,
    DATABASE,
    Baseline,
    Fired,
    Streaks,
    check_crash_loop,
    check_probes,
)

log = logging.getLogger("changeover.monitor")

ProbeFn = Callable[[], Awaitable[tuple[bool, str]]]
CriticalFn = Callable[[], Awaitable[list[tuple[str, bool, str]]]]
CrashesFn = Callable[[float], Awaitable[int]]
SyntheticFn = Callable[[], Awaitable[None]]
PairedFn = Callable[[], Awaitable[tuple[float, float] | None]]

MAX_SYNTHETIC_INFLIGHT = 4  # a slow app must not pile up smoke requests


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


class Observer(TrafficJudge):
    def __init__(self, cfg: MonitorConfig, metrics: Recorder, live_slot: str,
                 baseline: WindowStats | Baseline | None, probes: Probes | None = None,
                 clock: Clock = time.monotonic, *, elapsed: float = 0.0) -> None:
        """`elapsed`: seconds of this window already observed (a restarted daemon resuming it):
        the window started that long ago, on this clock, so it ends that much sooner, windows
        reach back to the original switch, and the verdict's `elapsed` counts from it."""
        self.probes = probes or Probes()
        super().__init__(cfg, metrics, live_slot, baseline, clock, elapsed,
                         paired=self.probes.paired is not None and cfg.paired_probes > 0)
        self.verdict: Verdict | None = None
        self._db = Streaks()
        self._critical = Streaks()
        self._synthetic_sent: deque[float] = deque()
        self._synthetic_tasks: set[asyncio.Task[None]] = set()
        self._done: asyncio.Future[Verdict] | None = None
        self._stopped = False   # run() is over: every loop ends, even one whose cancel a timeout swallowed


    # -- control ------------------------------------------------------------------------------
    def cancel(self, reason: str = CANCELLED, evidence: dict[str, Any] | None = None) -> None:
        """End the window now with ok=False (a manual rollback); run() returns that verdict."""
        self._finish(Verdict(False, reason, f"observation stopped: {reason}", evidence or {},
                             self.clock() - self.start))

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
