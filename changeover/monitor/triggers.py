"""The rollback triggers as pure judgements over the recorder's numbers.

Each check takes what it needs and returns a `Fired` (reason, one-line message, evidence with
the numbers) or None. The observer decides when to call them; keeping them free of timing makes
the statistics testable with a fake clock and synthetic traffic.

Choices that keep a healthy-but-noisy release alive:
- error rate: the trigger fires when we are `confidence` sure the *true* error rate is above
  `error_rate` (Wilson score lower bound), not when the observed ratio is. With 20 requests and
  1 % background errors a plain ratio would cross 5 % on 2 errors (1.7 % of windows); the bound
  needs 4. A release failing every request still fires at the first judgement (20/20 -> bound
  0.79), and the consecutive-failure fast path does not wait for min_requests at all.
- latency: the limit is max(ratio x baseline p95, baseline p95 + latency_min_increase) (a
  sub-millisecond app's 2x jitter is no regression). Green's p95 is above it when more than 5 % of
  its requests are slower; like the error rate, that must hold with `confidence` (Wilson bound on
  the slow share), in each of `latency_windows` disjoint consecutive windows holding
  `latency_min_samples` requests. A point estimate of p95 from ~100 samples of a heavy-tailed
  distribution swings by 1.5x on its own; the bound does not, and +200 ms still fires at once.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

# Re-exported: callers import the baseline from here.
from changeover.monitor.baseline import Baseline as Baseline
from changeover.monitor.baseline import Level, Sparse
from changeover.monitor.baseline import capture_baseline as capture_baseline
from changeover.monitor.baseline import make_baseline as make_baseline
from changeover.monitor.buckets import BOUNDS
from changeover.monitor.compare import RankTest, limit_for, reference, rps_level
from changeover.monitor.config import MonitorConfig
from changeover.monitor.stats import WindowStats, count_above, quantile

ERROR_RATE = "error_rate"
CONSECUTIVE_FAILURES = "consecutive_failures"
LATENCY = "latency"
DATABASE = "database"
CRITICAL = "critical"
CRASH_LOOP = "crash_loop"
CANCELLED = "cancelled"
TAIL = 0.05  # p95: the share of requests allowed to be slower than the limit

REASONS = (ERROR_RATE, CONSECUTIVE_FAILURES, LATENCY, DATABASE, CRITICAL, CRASH_LOOP, CANCELLED)


@dataclass(frozen=True)
class Fired:
    reason: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _ms(v: float | None) -> float | None:
    """Seconds -> milliseconds rounded for evidence and messages."""
    return None if v is None else round(v * 1000, 3)


def z_for(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def wilson_lower(errors: float, n: int, z: float) -> float:
    """Lower bound of the Wilson score interval for a binomial proportion."""
    if n <= 0:
        return 0.0
    p = errors / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


def check_consecutive(run: int, cfg: MonitorConfig) -> Fired | None:
    if run < cfg.consecutive_failures:
        return None
    return Fired(CONSECUTIVE_FAILURES, f"{run} requests in a row failed (limit {cfg.consecutive_failures})",
                 {"consecutive_failures": run, "limit": cfg.consecutive_failures})


def check_error_rate(w: WindowStats, cfg: MonitorConfig, z: float) -> Fired | None:
    if w.requests < cfg.min_requests:
        return None
    lower = wilson_lower(w.errors, w.requests, z)
    if lower <= cfg.error_rate:
        return None
    return Fired(
        ERROR_RATE,
        f"error rate {w.error_rate:.1%} ({w.errors}/{w.requests} in {w.seconds:.1f}s) "
        f"above {cfg.error_rate:.1%}",
        {"window_seconds": round(w.seconds, 3), "requests": w.requests, "errors": w.errors,
         "upstream_failures": w.upstream_failures, "status": dict(w.status),
         "error_rate": round(w.error_rate, 5), "lower_bound": round(lower, 5),
         "confidence": cfg.confidence, "threshold": cfg.error_rate},
    )


def latency_limit(baseline: Baseline, cfg: MonitorConfig) -> float | None:
    """The p95 above which the new release counts as slow at the pre-switch load, or None when
    the pre-switch window is no baseline (too few samples, or errors above `error_rate`)."""
    if baseline.p95 is None or baseline.requests < cfg.latency_min_samples or baseline.rejected \
            or _errors(baseline) > cfg.error_rate * baseline.requests:
        return None
    return limit_for(baseline.p95, cfg)


def _errors(b: Baseline) -> int:
    return b.errors or round(b.error_rate * b.requests)


def _series(baseline: Baseline, route: str | None) -> tuple[tuple[Level, ...],
                                                            tuple[int, int, Sparse, float] | None]:
    """The load profile and pre-switch window of the slot or of one route."""
    if route is not None:
        rb = baseline.route(route)
        if rb is None:
            return (), None
        return rb.levels, (rb.requests, rb.errors, rb.hist, baseline.seconds)
    hist = baseline.hist
    if not hist and baseline.p95 is not None:
        # a baseline made from bare numbers (no histogram): its p95 as the only sample that counts
        hist = ((bisect_left(BOUNDS, baseline.p95), baseline.requests),)
    return baseline.levels, (baseline.requests, _errors(baseline), hist, baseline.seconds)


LatencyWindow = tuple[int, list[int], float]     # requests, histogram, seconds


def judge_latency(windows: list[LatencyWindow], baseline: Baseline, cfg: MonitorConfig, z: float, *,
                  rps: float, route: str | None = None, probes: RankTest | None = None,
                  shared: float = 1.0, probe_alpha: float | None = None,
                  ) -> tuple[Fired | None, dict[str, Any]]:
    """`windows`: the latest `latency_windows` disjoint windows (newest first) of the slot or of
    `route`, each with `latency_min_samples`; `rps`: the slot's load over them. Each window must
    show with `confidence` that more than 5 % of its requests were slower than the limit (a
    one-sided binomial test on the tail), the limit coming from the old release at a comparable
    load (compare.reference), times `shared`: how much slower the rest of the slot got meanwhile
    (a route is judged on what is its own). Paired probes, when there are enough, must agree
    that the new release is slower than the old one at the same moment: a slowdown both slots
    share (the host, the database, more clients queueing) is no regression.
    `probe_alpha`: the rank test's significance level (the observer corrects it for its looks).
    Returns (fired or None, what was compared, for `status`)."""
    levels, window = _series(baseline, route)
    ref, busiest = reference(levels, window, rps, cfg)
    load = {"rps": round(rps, 2), "level": rps_level(rps)}
    if ref is None and busiest is None:
        return None, {"source": "none", "load": load}
    use = ref or busiest
    assert use is not None
    limit = limit_for(use.p95 * max(1.0, shared), cfg)
    info: dict[str, Any] = {"source": use.source if ref else "paired_probes", "load": load,
                            "baseline": use.to_dict(), "limit_ms": _ms(limit)}
    if shared > 1.0:
        info["shared_slowdown"] = round(shared, 3)
    if probes is not None:
        info["probes"] = probes.to_dict()
    if len(windows) < cfg.latency_windows:
        return None, info
    tails = []
    for req, hist, _ in windows:
        if req < cfg.latency_min_samples:
            return None, info
        slow = count_above(hist, limit)
        if wilson_lower(slow, req, z) <= TAIL:
            return None, info
        tails.append(slow / req)
    alpha = 1 - cfg.confidence if probe_alpha is None else probe_alpha
    slower = probes is not None and probes.n >= 1 and probes.p < alpha \
        and probes.median_new > limit_for(probes.median_old, cfg)
    if ref is None and not slower:
        # busier than the old release ever was: only a slowdown the paired probes confirm counts
        if probes is None:
            info["source"] = "none (busier than any baseline, no paired probes)"
        return None, info
    if probes is not None and not slower:
        info["vetoed"] = "the paired probes show no slowdown of the new release against the old one"
        return None, info
    p95s = [quantile(h, n, 0.95) for n, h, _ in windows]
    worst = min(p for p in p95s if p is not None)
    where = f"route {route}: " if route else ""
    return Fired(
        LATENCY,
        f"{where}p95 latency {_ms(worst)} ms over {len(windows)} windows at {rps:.0f} req/s, "
        f"baseline {_ms(use.p95)} ms at {use.rps:.0f} req/s ({info['source']}; limit {_ms(limit)} ms "
        f"= max({cfg.latency_ratio:g}x, +{_ms(cfg.latency_min_increase)} ms))",
        {**({"route": route} if route else {}), **info,
         "p95_ms": [_ms(p) for p in p95s], "p99_ms": [_ms(quantile(h, n, 0.99)) for n, h, _ in windows],
         "requests": [n for n, _, _ in windows], "slower_than_limit": [round(t, 4) for t in tails],
         "window_seconds": [round(sec, 3) for _, _, sec in windows],
         "baseline_window": baseline.summary(), "ratio": cfg.latency_ratio,
         "ratio_observed": round(worst / use.p95, 3) if use.p95 else None, "confidence": cfg.confidence},
    ), info


def check_latency(windows: list[tuple[WindowStats, list[int]]], baseline: Baseline, cfg: MonitorConfig,
                  z: float, probes: RankTest | None = None) -> Fired | None:
    """The slot's latency trigger over its WindowStats (see judge_latency)."""
    lw = [(w.requests, h, w.seconds) for w, h in windows]
    secs = sum(w.seconds for w, _ in windows)
    rps = sum(w.requests for w, _ in windows) / max(secs, 1.0)
    return judge_latency(lw, baseline, cfg, z, rps=rps, probes=probes)[0]


def check_route_error_rate(route: str, requests: int, errors: int, seconds: float, cfg: MonitorConfig,
                           z: float) -> Fired | None:
    """The error-rate trigger for one route (z already corrected for the number of routes)."""
    if requests < cfg.min_requests:
        return None
    lower = wilson_lower(errors, requests, z)
    if lower <= cfg.error_rate:
        return None
    return Fired(
        ERROR_RATE,
        f"route {route}: error rate {errors / requests:.1%} ({errors}/{requests} in {seconds:.1f}s) "
        f"above {cfg.error_rate:.1%}",
        {"route": route, "window_seconds": round(seconds, 3), "requests": requests, "errors": errors,
         "error_rate": round(errors / requests, 5), "lower_bound": round(lower, 5),
         "confidence": cfg.confidence, "z": round(z, 3), "threshold": cfg.error_rate},
    )


def check_route_consecutive(route: str, run: int, cfg: MonitorConfig) -> Fired | None:
    if run < cfg.consecutive_failures:
        return None
    return Fired(CONSECUTIVE_FAILURES,
                 f"route {route}: {run} requests in a row failed (limit {cfg.consecutive_failures})",
                 {"route": route, "consecutive_failures": run, "limit": cfg.consecutive_failures})


def z_corrected(confidence: float, tests: int) -> float:
    """z for `confidence` over `tests` simultaneous tests (Bonferroni): judging 30 routes, or 30
    disjoint windows in one observation, must not be 30 times as likely to fire by chance."""
    return z_for(1 - (1 - confidence) / max(1, tests))


def check_crash_loop(crashes: int, within: float, cfg: MonitorConfig) -> Fired | None:
    if crashes < cfg.crash_loop_crashes:
        return None
    return Fired(CRASH_LOOP, f"{crashes} instance crashes within {within:.0f}s "
                             f"(limit {cfg.crash_loop_crashes} in {cfg.crash_loop_within:g}s)",
                 {"crashes": crashes, "within_seconds": round(within, 3), "limit": cfg.crash_loop_crashes})


class Streaks:
    """Consecutive failures per probe name; a success resets that name. Keeps the last details."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.details: dict[str, list[str]] = {}

    def update(self, name: str, ok: bool, detail: str) -> int:
        if ok:
            self.count[name] = 0
            self.details[name] = []
            return 0
        self.count[name] = self.count.get(name, 0) + 1
        self.details[name] = [*self.details.get(name, []), detail][-5:]
        return self.count[name]


def check_probes(streaks: Streaks, names: list[str], reason: str, cfg: MonitorConfig) -> Fired | None:
    """Fire `reason` when any of `names` failed probe_failures rounds in a row."""
    bad = [n for n in names if streaks.count.get(n, 0) >= cfg.probe_failures]
    if not bad:
        return None
    what = "database" if reason == DATABASE else "critical service"
    first = bad[0]
    last = streaks.details[first][-1] if streaks.details.get(first) else ""
    return Fired(
        reason,
        f"{what} check {first!r} failed {streaks.count[first]} times in a row: {last}",
        {"failed": {n: {"consecutive": streaks.count[n], "output": streaks.details.get(n, [])}
                    for n in bad},
         "limit": cfg.probe_failures},
    )
