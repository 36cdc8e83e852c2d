"""Per-slot request metrics, kept by the proxy's hot path and read by the observer and /metrics.

Each slot has a ring of per-second buckets (request counts by outcome and a log-bucketed latency
histogram per second) covering the last `history` seconds, so any sliding window is a sum of a few
buckets. `record()` runs once per proxied request in the event-loop thread: it does a clock read,
a dict lookup, a bisect over a constant tuple and appends one small tuple; the counting happens in
bulk (ring.py `group`) before anything is read, so readers call `group()`/`flush()` first. No
locks: the proxy, the observer and the exporter share one thread. Cumulative totals per (slot,
version) feed the Prometheus counters, which must never go down.

The ring itself is ring.py's, what a window adds up to stats.py's.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable

from changeover.monitor.buckets import BOUNDS, NBUCKETS
from changeover.monitor.config import DEFAULT_HISTORY
from changeover.monitor.ring import PARKED, REQ, SlotMetrics, Totals
from changeover.monitor.routebook import FAILED, UPSTREAM_FAILED
from changeover.monitor.routes import RouteRules
from changeover.monitor.stats import WindowStats, empty_stats, slot_stats

Clock = Callable[[], float]


MAX_VERSIONS_PER_SLOT = 8         # cumulative series kept per slot for /metrics


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
        self._totals: dict[tuple[str, str], Totals] = {}

    # -- hot path -----------------------------------------------------------------------------
    def record(self, slot: str, status: int, seconds: float, upstream_failed: bool,
               request: bytes | str | None = None) -> None:
        """request: the raw request head or line ("GET /cart/42 HTTP/1.1\r\n..."), only kept
        here by reference; it is grouped by route when the requests are counted (ring.py)."""
        s = self._slots.get(slot)
        if s is None:
            s = self._add(slot)
        now = int(self.clock())
        if now != s.sec:
            self._roll(s, now)
        code = bisect_left(BOUNDS, seconds)
        if upstream_failed or status >= 500:
            s.run += 1                  # here, not when counted: the trigger reads it any time
            code += UPSTREAM_FAILED if upstream_failed else FAILED
        else:
            s.run = 0
        s.lsum += seconds
        p = s.pend
        p.append((request, status, code))
        if len(p) >= PARKED:
            s.group()

    def flush(self) -> None:
        """Count every slot's pending requests (before the counters or totals are read)."""
        for s in self._slots.values():
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
        s.totals = self._totals.setdefault((slot, ""), Totals())
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
        s.group()                       # what ended before the change is the previous release's
        s.clear(self.clock())
        s.version = version
        s.totals = self._totals.setdefault((slot, version), Totals())
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
        self.flush()
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
            return empty_stats(slot, "", 0.0), [0] * NBUCKETS
        s.advance(int(now))
        last = int(now) - offset
        first = last - n
        start: float = first
        stop = now if offset == 0 else float(last + 1)
        floor = s.first if since is None else max(s.first, since)
        if floor > start:
            first, start = int(floor), floor
        counts, hist = s.sums(first, last)
        return slot_stats(s, counts, hist, max(stop - start, 0.0)), hist


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
