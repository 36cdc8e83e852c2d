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
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

# Re-exported: callers import the baseline from here.
from changeover.monitor.baseline import Baseline as Baseline
from changeover.monitor.baseline import capture_baseline as capture_baseline
from changeover.monitor.baseline import make_baseline as make_baseline
from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import WindowStats, count_above

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
    """The p95 above which the new release counts as slow, or None when the baseline is too thin."""
    if baseline.p95 is None or baseline.requests < cfg.latency_min_samples or baseline.rejected:
        return None
    return max(baseline.p95 * cfg.latency_ratio, baseline.p95 + cfg.latency_min_increase)


def check_latency(windows: list[tuple[WindowStats, list[int]]], baseline: Baseline, cfg: MonitorConfig,
                  z: float) -> Fired | None:
    """`windows`: the latest `latency_windows` disjoint windows with their histograms, newest
    first. Each must show, with `confidence`, that more than 5 % of requests were slower than the
    limit, i.e. that the true p95 is above it (a one-sided binomial test on the tail)."""
    limit = latency_limit(baseline, cfg)
    if limit is None or len(windows) < cfg.latency_windows:
        return None
    tails = []
    for w, hist in windows:
        if w.requests < cfg.latency_min_samples or w.p95 is None:
            return None
        slow = count_above(hist, limit)
        if wilson_lower(slow, w.requests, z) <= TAIL:
            return None
        tails.append(slow / w.requests)
    p95s = [w.p95 for w, _ in windows]
    worst = min(p for p in p95s if p is not None)
    base = baseline.p95 or 0.0
    return Fired(
        LATENCY,
        f"p95 latency {_ms(worst)} ms over {len(windows)} windows, baseline {_ms(base)} ms "
        f"(limit {_ms(limit)} ms = max({cfg.latency_ratio:g}x, +{_ms(cfg.latency_min_increase)} ms))",
        {"p95_ms": [_ms(p) for p in p95s], "p99_ms": [_ms(w.p99) for w, _ in windows],
         "requests": [w.requests for w, _ in windows],
         "slower_than_limit": [round(t, 4) for t in tails],
         "window_seconds": [round(w.seconds, 3) for w, _ in windows],
         "baseline": baseline.summary(), "limit_ms": _ms(limit), "ratio": cfg.latency_ratio,
         "ratio_observed": round(worst / base, 3) if base else None, "confidence": cfg.confidence},
    )


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
