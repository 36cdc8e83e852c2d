"""What a window of a slot's traffic adds up to (`WindowStats`), and the quantiles and tail counts
read off a latency histogram over the buckets' BOUNDS."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import asdict, dataclass
from typing import Any

from changeover.monitor.buckets import BOUNDS
from changeover.monitor.ring import CLASS0, CLASSES, ERR, REQ, UPSTREAM, SlotMetrics


def quantile(hist: list[int], total: int, q: float) -> float | None:
    """The q-quantile of a histogram over BOUNDS, interpolated log-linearly inside a bucket."""
    if total <= 0:
        return None
    rank = q * total
    cum = 0
    for b, n in enumerate(hist):
        if n and cum + n >= rank:
            if b >= len(BOUNDS):
                return BOUNDS[-1]  # overflow bucket: all we know is "at least this"
            frac = (rank - cum) / n
            hi = BOUNDS[b]
            if b == 0:
                return hi * frac
            lo = BOUNDS[b - 1]
            return float(lo * (hi / lo) ** frac)
        cum += n
    return BOUNDS[-1]


@dataclass(frozen=True)
class WindowStats:
    """One slot's traffic over a window. Latencies in seconds, None when there were no requests."""

    slot: str
    version: str
    seconds: float          # time actually covered (never before the slot's first request/`since`)
    requests: int
    errors: int             # 5xx sent to clients + upstream failures
    upstream_failures: int
    status: dict[str, int]  # "2xx" -> count ...
    rps: float
    error_rate: float
    p50: float | None
    p95: float | None
    p99: float | None
    consecutive_failures: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the control API (`changeover status`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def count_above(hist: list[int], limit: float) -> float:
    """How many samples of a histogram are slower than `limit` (log-uniform within its bucket)."""
    b = bisect_left(BOUNDS, limit)
    above: float = sum(hist[b + 1:])
    if b >= len(BOUNDS) or not hist[b]:
        return above + (hist[b] if b < len(hist) else 0)
    hi = BOUNDS[b]
    if b == 0:
        share = (hi - limit) / hi if hi > 0 else 0.0
    else:
        lo = BOUNDS[b - 1]
        share = math.log(hi / limit) / math.log(hi / lo) if limit > lo else 1.0
    return above + hist[b] * share


def empty_stats(slot: str, version: str, span: float) -> WindowStats:
    return WindowStats(slot, version, span, 0, 0, 0, dict.fromkeys(CLASSES, 0), 0.0, 0.0,
                       None, None, None, 0)


def slot_stats(s: SlotMetrics, counts: list[int], hist: list[int], span: float) -> WindowStats:
    req = counts[REQ]
    if not req:
        return empty_stats(s.name, s.version, span)
    return WindowStats(
        slot=s.name, version=s.version, seconds=span, requests=req, errors=counts[ERR],
        upstream_failures=counts[UPSTREAM],
        status={name: counts[CLASS0 + k] for k, name in enumerate(CLASSES, 1)},
        # A span under a second (just after a switch) would inflate req/s: count it as one.
        rps=req / max(span, 1.0), error_rate=counts[ERR] / req,
        p50=quantile(hist, req, 0.50), p95=quantile(hist, req, 0.95), p99=quantile(hist, req, 0.99),
        consecutive_failures=s.run,
    )
