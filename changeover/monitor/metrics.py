"""Per-slot request metrics, kept by the proxy's hot path and read by the observer and /metrics.

Each slot has a ring of per-second buckets (request counts by outcome and a log-bucketed latency
histogram per second) covering the last `history` seconds, so any sliding window is a sum of a few
buckets. `record()` runs once per proxied request in the event-loop thread: it does a clock read,
a dict lookup, a bisect over a constant tuple and a handful of integer increments into
pre-allocated lists; no locks (the proxy, the observer and the exporter share one thread), no
objects built per call. Cumulative totals per (slot, version) feed the Prometheus counters, which
must never go down.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from changeover.monitor.buckets import BOUNDS as BOUNDS
from changeover.monitor.buckets import BUCKETS_PER_OCTAVE as BUCKETS_PER_OCTAVE
from changeover.monitor.buckets import MIN_LATENCY as MIN_LATENCY
from changeover.monitor.buckets import NBUCKETS as NBUCKETS
from changeover.monitor.config import DEFAULT_HISTORY
from changeover.monitor.routebook import FAILED, UPSTREAM_FAILED, LoadProfile, RouteBook, level_of
from changeover.monitor.routes import RouteRules

Clock = Callable[[], float]


# Layout of one second's counters (and of a version's totals): stride C in a flat list.
REQ, ERR, UPSTREAM = 0, 1, 2      # errors = 5xx or upstream failure (what the triggers count)
CLASS0 = 2                        # index of status class k (1..5) is CLASS0 + k
C = 8
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
MAX_VERSIONS_PER_SLOT = 8         # cumulative series kept per slot for /metrics
PARKED = 512                      # requests parked per slot before they are grouped by route


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


class _Totals:
    """Cumulative counters of one (slot, version), for Prometheus."""

    __slots__ = ("counts", "hist", "sum")

    def __init__(self) -> None:
        self.counts = [0] * C
        self.hist = [0] * NBUCKETS
        self.sum = 0.0


class SlotMetrics:
    """The ring of per-second buckets of one slot. Second t lives at index t % size."""

    __slots__ = ("book", "cbase", "codes", "counts", "first", "folded", "hbase", "hist", "name", "nparked",
                 "parked", "profile", "run", "sec", "size", "tcounts", "thist", "totals", "version")

    def __init__(self, name: str, size: int, now: float, rules: RouteRules) -> None:
        self.name = name
        self.size = size
        self.counts = [0] * (size * C)
        self.hist = [0] * (size * NBUCKETS)
        self.sec = int(now)
        self.hbase = (self.sec % size) * NBUCKETS   # where the current second's row starts
        self.cbase = (self.sec % size) * C
        self.first = now        # windows never reach before this (slot creation or release change)
        self.run = 0            # current run of consecutive failures
        self.version = ""
        self.totals = _Totals()
        self.tcounts = self.totals.counts
        self.thist = self.totals.hist
        # Requests parked by the hot path until they are grouped by route (see routebook.py).
        self.parked: list[bytes | str | None] = [None] * PARKED
        self.codes = [0] * PARKED
        self.nparked = 0
        self.book = RouteBook(rules)
        self.profile = LoadProfile()
        self.folded = self.sec - 1      # seconds up to this one are in the load profiles

    def group(self) -> None:
        """Group the parked requests by route, into the current second."""
        if self.nparked:
            self.book.add(self.parked, self.codes, self.nparked, self.sec)
            self.nparked = 0

    def fold(self, upto: int) -> None:
        """Add the complete seconds up to `upto` to the load profiles (slot and routes)."""
        first = max(self.folded + 1, self.sec - self.size + 1)
        for t in range(first, min(upto, self.sec) + 1):
            cb = (t % self.size) * C
            n = self.counts[cb]
            if not n:
                continue
            if t <= int(self.first):
                self.book.fold(t, None)  # the release's first second is partial: not a load sample
                continue
            level = level_of(n)
            self.profile.add(level, n, self.counts[cb + 1], self.hist, (t % self.size) * NBUCKETS)
            self.book.fold(t, level)
        self.folded = max(self.folded, upto)

    def advance(self, now: int) -> None:
        """Move to second `now`, zeroing the buckets of the seconds skipped (they had no traffic)."""
        gap = now - self.sec
        if gap <= 0:
            return  # a clock that went backwards keeps writing into the current bucket
        self.group()  # parked requests belong to the second that is ending
        size = self.size
        if gap >= size:
            self.counts[:] = [0] * (size * C)
            self.hist[:] = [0] * (size * NBUCKETS)
        else:
            zc, zh = [0] * C, [0] * NBUCKETS
            for t in range(self.sec + 1, now + 1):
                i = t % size
                self.counts[i * C:(i + 1) * C] = zc
                self.hist[i * NBUCKETS:(i + 1) * NBUCKETS] = zh
        self.sec = now
        self.hbase = (now % size) * NBUCKETS
        self.cbase = (now % size) * C

    def clear(self, now: float) -> None:
        self.nparked = 0
        self.parked = [None] * PARKED
        self.book = RouteBook(self.book.rules)
        self.profile = LoadProfile()
        self.counts[:] = [0] * (self.size * C)
        self.hist[:] = [0] * (self.size * NBUCKETS)
        self.sec = int(now)
        self.hbase = (self.sec % self.size) * NBUCKETS
        self.cbase = (self.sec % self.size) * C
        self.first = now
        self.run = 0
        self.folded = self.sec - 1

    def sums(self, first: int, last: int) -> tuple[list[int], list[int]]:
        """Counters and histogram summed over seconds first..last (inclusive, already advanced)."""
        counts = [0] * C
        hist = [0] * NBUCKETS
        first = max(first, self.sec - self.size + 1)
        for t in range(first, min(last, self.sec) + 1):
            i = t % self.size
            cb, hb = i * C, i * NBUCKETS
            if not self.counts[cb]:
                continue  # no requests that second: nothing to add
            counts = [a + b for a, b in zip(counts, self.counts[cb:cb + C], strict=True)]
            hist = [a + b for a, b in zip(hist, self.hist[hb:hb + NBUCKETS], strict=True)]
        return counts, hist


class Recorder:
    """Implements changeover.proxy.base.RequestRecorder; one per daemon, shared by all slots."""

    def __init__(self, history: float = DEFAULT_HISTORY, clock: Clock = time.monotonic,
                 routes: RouteRules | None = None) -> None:
        # Slack beyond `history`: a window of n seconds reads n+1 buckets, and chained disjoint
        # windows (latency confirmation) each add one.
        self.size = math.ceil(history) + 16
        self.clock = clock
        self.rules = routes or RouteRules()
        self._slots: dict[str, SlotMetrics] = {}
        self._totals: dict[tuple[str, str], _Totals] = {}

    # -- hot path -----------------------------------------------------------------------------
    def record(self, slot: str, status: int, seconds: float, upstream_failed: bool,
               request: bytes | str | None = None) -> None:
        """request: the raw request head or line ("GET /cart/42 HTTP/1.1\r\n..."), only parked
        here by reference; it is grouped by route when the second ends (routebook.py)."""
        s = self._slots.get(slot)
        if s is None:
            s = self._add(slot)
        now = int(self.clock())
        if now != s.sec:
            self._roll(s, now)
        c, t, base = s.counts, s.tcounts, s.cbase
        # Literal offsets (REQ=0, ERR=1, UPSTREAM=2, class k at 2+k): no global lookups here.
        c[base] += 1
        t[0] += 1
        b = bisect_left(BOUNDS, seconds)
        code = b
        if upstream_failed or status >= 500:
            c[base + 1] += 1
            t[1] += 1
            s.run += 1
            code = b + FAILED
            if upstream_failed:
                c[base + 2] += 1
                t[2] += 1
                code = b + UPSTREAM_FAILED
        else:
            s.run = 0
        k = status // 100
        if 0 < k < 6:
            c[base + 2 + k] += 1
            t[2 + k] += 1
        s.hist[s.hbase + b] += 1
        s.thist[b] += 1
        s.totals.sum += seconds
        if request is not None:
            i = s.nparked
            s.parked[i] = request
            s.codes[i] = code
            s.nparked = i + 1
            if i + 1 == PARKED:
                s.group()

    def _roll(self, s: SlotMetrics, now: int) -> None:
        """A new second on the hot path (once a second per slot): group, profile, move on."""
        s.group()
        s.fold(s.sec)
        s.advance(now)
        s.book.prune(now)

    # -- set by the daemon --------------------------------------------------------------------
    def _add(self, slot: str) -> SlotMetrics:
        s = SlotMetrics(slot, self.size, self.clock(), self.rules)
        s.totals = self._totals.setdefault((slot, ""), _Totals())
        s.tcounts, s.thist = s.totals.counts, s.totals.hist
        self._slots[slot] = s
        return s

    def set_version(self, slot: str, version: str | None) -> None:
        """The release now running in `slot` (None: none). A new release starts with an empty
        window, so its verdict is never mixed with the previous occupant's traffic."""
        version = version or ""
        s = self._slots.get(slot) or self._add(slot)
        if s.version == version:
            return
        s.clear(self.clock())
        s.version = version
        s.totals = self._totals.setdefault((slot, version), _Totals())
        s.tcounts, s.thist = s.totals.counts, s.totals.hist
        mine = [key for key in self._totals if key[0] == slot and key[1] != version]
        for key in mine[:max(0, len(mine) - MAX_VERSIONS_PER_SLOT + 1)]:
            del self._totals[key]

    def version(self, slot: str) -> str:
        s = self._slots.get(slot)
        return s.version if s else ""

    def slots(self) -> list[str]:
        return sorted(self._slots)

    def consecutive_failures(self, slot: str) -> int:
        s = self._slots.get(slot)
        return s.run if s else 0

    def totals(self) -> list[tuple[str, str, list[int], list[int], float]]:
        """(slot, version, counts[C], histogram per bucket, latency sum) for /metrics."""
        return [(slot, ver, list(t.counts), list(t.hist), t.sum)
                for (slot, ver), t in sorted(self._totals.items()) if t.counts[REQ]]

    # -- windows ------------------------------------------------------------------------------
    def window(self, slot: str, seconds: float, *, since: float | None = None,
               offset: int = 0) -> WindowStats:
        """Traffic of `slot` over the last `seconds` (whole buckets: the current partial second
        plus `round(seconds)` full ones before it), never before `since` or the slot's release.
        `offset` shifts the window back by whole seconds, for disjoint consecutive windows."""
        return self.window_hist(slot, seconds, since=since, offset=offset)[0]

    def window_hist(self, slot: str, seconds: float, *, since: float | None = None,
                    offset: int = 0) -> tuple[WindowStats, list[int]]:
        """`window()` plus its latency histogram (counts per BOUNDS bucket)."""
        now = self.clock()
        n = max(1, round(seconds))
        s = self._slots.get(slot)
        if s is None:
            return _empty(slot, "", 0.0), [0] * NBUCKETS
        s.advance(int(now))
        last = int(now) - offset
        first = last - n
        start: float = first
        stop = now if offset == 0 else float(last + 1)
        floor = s.first if since is None else max(s.first, since)
        if floor > start:
            first, start = int(floor), floor
        counts, hist = s.sums(first, last)
        return _stats(s, counts, hist, max(stop - start, 0.0)), hist


RouteWindow = tuple[str, int, int, list[int]]   # (route, requests, errors, histogram)


def _span(rec: Recorder, s: SlotMetrics, seconds: float, since: float | None, offset: int) -> tuple[int, int]:
    now = int(rec.clock())
    s.advance(now)
    s.group()
    last = now - offset
    first = last - max(1, round(seconds))
    floor = s.first if since is None else max(s.first, since)
    return max(first, int(floor)), last


def route_windows(rec: Recorder, slot: str, seconds: float, *, since: float | None = None,
                  offset: int = 0, latency: bool = True) -> list[RouteWindow]:
    """Every route of `slot` over a window (the same seconds as Recorder.window), busiest first;
    without `latency` the histograms are left empty (the error-rate trigger needs counts only)."""
    s = rec._slots.get(slot)
    if s is None:
        return []
    first, last = _span(rec, s, seconds, since, offset)
    out = []
    for i, name in enumerate(s.book.names):
        req, err, hist = s.book.window(i, first, last, latency)
        if req:
            out.append((name, req, err, hist))
    return sorted(out, key=lambda r: -r[1])


def route_runs(rec: Recorder, slot: str) -> dict[str, int]:
    """Current run of consecutive failures per route of `slot` (only routes with a run)."""
    s = rec._slots.get(slot)
    if s is None:
        return {}
    s.group()
    return {n: r for n, r in zip(s.book.names, s.book.runs, strict=True) if r}


def route_totals(rec: Recorder) -> list[tuple[str, str, str, list[int]]]:
    """(slot, version, route, [requests, errors, upstream failures, histogram...]) of every
    route's complete seconds, for the opt-in per-route Prometheus series."""
    return [(name, s.version, route, list(s.book.totals[i]))
            for name, s in sorted(rec._slots.items()) for i, route in enumerate(s.book.names)
            if s.book.totals[i][0]]


def load_profile(rec: Recorder, slot: str, route: str | None = None,
                 ) -> list[tuple[int, int, int, int, list[int]]]:
    """What `slot`'s release did per load level over its life: [(level, seconds, requests,
    errors, histogram)], for the slot or one route."""
    s = rec._slots.get(slot)
    if s is None:
        return []
    if route is None:
        return s.profile.snapshot()
    i = s.book.index.get(route)
    return [] if i is None else s.book.profiles[i].snapshot()


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


def _empty(slot: str, version: str, span: float) -> WindowStats:
    return WindowStats(slot, version, span, 0, 0, 0, dict.fromkeys(CLASSES, 0), 0.0, 0.0,
                       None, None, None, 0)


def _stats(s: SlotMetrics, counts: list[int], hist: list[int], span: float) -> WindowStats:
    req = counts[REQ]
    if not req:
        return _empty(s.name, s.version, span)
    return WindowStats(
        slot=s.name, version=s.version, seconds=span, requests=req, errors=counts[ERR],
        upstream_failures=counts[UPSTREAM],
        status={name: counts[CLASS0 + k] for k, name in enumerate(CLASSES, 1)},
        # A span under a second (just after a switch) would inflate req/s: count it as one.
        rps=req / max(span, 1.0), error_rate=counts[ERR] / req,
        p50=quantile(hist, req, 0.50), p95=quantile(hist, req, 0.95), p99=quantile(hist, req, 0.99),
        consecutive_failures=s.run,
    )
