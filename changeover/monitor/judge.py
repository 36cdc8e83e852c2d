"""The traffic judgement of an observation window: the cheap synchronous sums over the recorder's
buckets that observer.py runs every `interval` (consecutive failures, error rate over the window and
a longer one, latency of the slot and of each route against the baseline, with the paired probes).

Each disjoint window of an observation is another chance for chance to fire: the error-rate bound
is corrected for that many looks (and, per route, for the routes judged)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from changeover.monitor.buckets import NBUCKETS
from changeover.monitor.compare import RankTest, signed_rank
from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Clock, Recorder, route_runs, route_windows
from changeover.monitor.stats import WindowStats, quantile
from changeover.monitor.triggers import (
    Baseline,
    Fired,
    check_consecutive,
    check_error_rate,
    check_route_consecutive,
    check_route_error_rate,
    judge_latency,
    z_corrected,
)

LONG_WINDOW_FACTOR = 6      # the error rate is also judged over 6 x window (capped by history) ...
LONG_WINDOW_EVERY = 1.0     # ... once a second: it is a slow-fault path, not the fast one
MIN_PAIRS = 20              # paired probes (within the latency windows' span) for the rank test
MAX_PAIRS = 600             # the most recent pairs kept


class TrafficJudge:
    """The new live slot's traffic against the baseline; `evaluate()` is one look."""

    def __init__(self, cfg: MonitorConfig, metrics: Recorder, live_slot: str,
                 baseline: WindowStats | Baseline | None, clock: Clock, elapsed: float, paired: bool) -> None:
        """`paired`: paired probes will come (`add_pair`): a latency verdict waits for their first samples."""
        self.cfg = cfg
        self.metrics = metrics
        self.slot = live_slot
        self.baseline = Baseline.from_stats(baseline) if isinstance(baseline, WindowStats) else baseline
        self.clock = clock
        self.start = clock() - max(0.0, elapsed)
        self.last: dict[str, Any] = {}            # latest numbers, for `changeover status`
        self._next_long = self.start
        self._looks = max(1, math.ceil(cfg.observe / cfg.window))
        self._z = z_corrected(cfg.confidence, self._looks)
        self._route_zs: dict[int, float] = {}
        span = cfg.latency_windows * (max(1, round(cfg.latency_window)) + 1)
        self._probe_alpha = (1 - cfg.confidence) / max(1, math.ceil(cfg.observe / span))
        self._probe_wait = self.start + (2 * MIN_PAIRS / cfg.paired_probes if paired else 0.0)
        self._pairs: deque[tuple[float, float, float]] = deque(maxlen=MAX_PAIRS)
        # A route that already failed under the old release is not this release's regression.
        self._failing_before = {r.route for r in (self.baseline.routes if self.baseline else ())
                                if r.requests >= cfg.min_requests and r.errors > cfg.error_rate * r.requests}
        if self._failing_before:
            self.last["routes_failing_before"] = sorted(self._failing_before)

    def add_pair(self, new: float, old: float) -> None:
        """One paired probe: seconds taken by the new slot and by the old one, same moment."""
        self._pairs.append((self.clock(), float(new), float(old)))

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
