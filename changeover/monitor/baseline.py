"""What the new release is judged against: the old release's latency and errors, per load level.

A single pre-switch window is an unfair baseline: deploy at a quiet moment, let the morning ramp
arrive during the observation window, and identical code looks slower because it is busier. So
the baseline also carries a *load profile*: the old release's latency histogram folded per load
level (the octave of its per-second request count) over its recent life, for the slot and for
each route. The latency trigger then compares the new release with what the old one did at a
comparable load (see triggers.comparable).

A baseline must be healthy to be one: a level, route or window whose error rate is above
`error_rate` is not used (`usable()`), and the evidence says so.

`Baseline.to_dict()` / `from_dict()` round-trip exactly through JSON (the daemon stores the
baseline with the deployment so a restarted daemon resumes the window against the same one);
`summary()` is the short, rounded form for evidence and `status`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from changeover.monitor.buckets import NBUCKETS
from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder, load_profile, route_windows
from changeover.monitor.stats import WindowStats, quantile

Sparse = tuple[tuple[int, int], ...]       # (latency bucket, count), buckets ascending


def sparse(hist: list[int]) -> Sparse:
    return tuple((b, n) for b, n in enumerate(hist) if n)


def dense(s: Sparse) -> list[int]:
    h = [0] * NBUCKETS
    for b, n in s:
        h[b] += n
    return h


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


@dataclass(frozen=True)
class Level:
    """The old release at one load level: seconds whose request count was in [2^level, 2^(level+1))."""

    level: int
    seconds: int
    requests: int
    errors: int
    hist: Sparse

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "seconds": self.seconds, "requests": self.requests,
                "errors": self.errors, "hist": [list(x) for x in self.hist]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Level:
        return cls(int(d["level"]), int(d["seconds"]), int(d["requests"]), int(d["errors"]),
                   tuple((int(b), int(n)) for b, n in d["hist"]))


@dataclass(frozen=True)
class RouteBaseline:
    """One route of the old release: its recent window (hist) and its load profile."""

    route: str
    requests: int
    errors: int
    hist: Sparse
    levels: tuple[Level, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "requests": self.requests, "errors": self.errors,
                "hist": [list(x) for x in self.hist], "levels": [lv.to_dict() for lv in self.levels]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouteBaseline:
        return cls(str(d["route"]), int(d["requests"]), int(d["errors"]),
                   tuple((int(b), int(n)) for b, n in d["hist"]),
                   tuple(Level.from_dict(x) for x in d.get("levels", [])))


@dataclass(frozen=True)
class Baseline:
    """The old slot's traffic just before the switch, plus its load profile and routes."""

    slot: str
    version: str
    seconds: float
    requests: int
    error_rate: float
    p50: float | None
    p95: float | None
    p99: float | None
    errors: int = 0
    hist: Sparse = ()
    levels: tuple[Level, ...] = ()
    routes: tuple[RouteBaseline, ...] = ()
    rejected: str = ""          # why the pre-switch window is not a baseline ("" = it is)

    @classmethod
    def from_stats(cls, w: WindowStats, hist: list[int] | None = None) -> Baseline:
        return cls(w.slot, w.version, w.seconds, w.requests, w.error_rate, w.p50, w.p95, w.p99,
                   errors=w.errors, hist=sparse(hist) if hist is not None else ())

    def to_dict(self) -> dict[str, Any]:
        """Exact, JSON-safe; `from_dict(to_dict())` gives an equal Baseline."""
        return {"slot": self.slot, "version": self.version, "seconds": self.seconds,
                "requests": self.requests, "error_rate": self.error_rate, "p50": self.p50,
                "p95": self.p95, "p99": self.p99, "errors": self.errors,
                "hist": [list(x) for x in self.hist], "levels": [lv.to_dict() for lv in self.levels],
                "routes": [r.to_dict() for r in self.routes], "rejected": self.rejected}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Baseline:
        def opt(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(str(d["slot"]), str(d["version"]), float(d["seconds"]), int(d["requests"]),
                   float(d["error_rate"]), opt(d.get("p50")), opt(d.get("p95")), opt(d.get("p99")),
                   errors=int(d.get("errors", 0)),
                   hist=tuple((int(b), int(n)) for b, n in d.get("hist", [])),
                   levels=tuple(Level.from_dict(x) for x in d.get("levels", [])),
                   routes=tuple(RouteBaseline.from_dict(x) for x in d.get("routes", [])),
                   rejected=str(d.get("rejected", "")))

    def summary(self) -> dict[str, Any]:
        """Rounded, small: for evidence, history and `status` (latencies in ms)."""
        return {"slot": self.slot, "version": self.version, "seconds": round(self.seconds, 3),
                "requests": self.requests, "error_rate": round(self.error_rate, 5),
                "p50": _ms(self.p50), "p95": _ms(self.p95), "p99": _ms(self.p99),
                "levels": [{"level": lv.level, "rps": round(lv.rps, 1), "seconds": lv.seconds,
                            "requests": lv.requests} for lv in self.levels],
                "routes": len(self.routes), **({"rejected": self.rejected} if self.rejected else {})}

    def route(self, name: str) -> RouteBaseline | None:
        for r in self.routes:
            if r.route == name:
                return r
        return None


def usable(requests: int, errors: int, cfg: MonitorConfig) -> bool:
    """A stretch of the old release's traffic is a baseline only with samples and few errors."""
    return requests >= cfg.latency_min_samples and errors <= cfg.error_rate * requests


def p95_of(hist: Sparse, requests: int) -> float | None:
    return quantile(dense(hist), requests, 0.95)


def _levels(snapshot: list[tuple[int, int, int, int, list[int]]]) -> tuple[Level, ...]:
    return tuple(Level(lv, secs, req, err, sparse(h)) for lv, secs, req, err, h in snapshot)


def capture_baseline(metrics: Recorder, slot: str, seconds: float) -> Baseline:
    """`slot` over its last `seconds`, with its load profile and its routes (each with theirs).
    Whether each part is usable is decided when it is used, by the observer's config."""
    w, hist = metrics.window_hist(slot, seconds)
    routes = tuple(RouteBaseline(name, req, err, sparse(h), _levels(load_profile(metrics, slot, name)))
                   for name, req, err, h in route_windows(metrics, slot, seconds))
    b = Baseline.from_stats(w, hist)
    return Baseline(b.slot, b.version, b.seconds, b.requests, b.error_rate, b.p50, b.p95, b.p99,
                    errors=b.errors, hist=b.hist, levels=_levels(load_profile(metrics, slot)), routes=routes)


def make_baseline(metrics: Recorder, slot: str, cfg: MonitorConfig) -> Baseline:
    """Build the baseline of `slot` (the live one, just before the switch): its last `baseline`
    seconds, its load profile over its recent life, and the same per route."""
    b = capture_baseline(metrics, slot, cfg.baseline)
    rejected = ""
    if b.requests and b.errors > cfg.error_rate * b.requests:
        rejected = f"{b.error_rate:.1%} errors in the last {b.seconds:.0f}s (above {cfg.error_rate:.1%})"
    return replace(b, rejected=rejected)
