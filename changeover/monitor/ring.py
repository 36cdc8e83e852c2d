"""One slot's ring of per-second buckets: request counts by outcome and a latency histogram per
second, covering the last `history` seconds, plus the cumulative totals of the release it runs.
The recorder (metrics.py) only appends one small tuple per request on the proxy's hot path; they
are counted here in bulk (`group`) when the second ends, when PARKED have piled up or before
anyone reads, so identical outcomes (the same request line, status and latency bucket) cost one
C-level count each rather than a dozen list stores per request."""

from __future__ import annotations

from collections import Counter

from changeover.monitor.buckets import NBUCKETS
from changeover.monitor.routebook import FAILED, UPSTREAM_FAILED, LoadProfile, RouteBook, level_of
from changeover.monitor.routes import RouteRules

# Layout of one second's counters (and of a version's totals): stride C in a flat list.
REQ, ERR, UPSTREAM = 0, 1, 2      # errors = 5xx or upstream failure (what the triggers count)
CLASS0 = 2                        # index of status class k (1..5) is CLASS0 + k
C = 8
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
PARKED = 512                      # requests pending per slot before they are counted


class Totals:
    """Cumulative counters of one (slot, version), for Prometheus."""

    __slots__ = ("counts", "hist", "sum")

    def __init__(self) -> None:
        self.counts = [0] * C
        self.hist = [0] * NBUCKETS
        self.sum = 0.0


class SlotMetrics:
    """The ring of per-second buckets of one slot. Second t lives at index t % size."""

    __slots__ = ("book", "cbase", "counts", "first", "folded", "hbase", "hist", "lsum", "name", "pend",
                 "profile", "run", "sec", "size", "tcounts", "thist", "totals", "version")

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
        self.totals = Totals()
        self.tcounts = self.totals.counts
        self.thist = self.totals.hist
        # Requests of the current second not counted yet: (request line or None, status, code),
        # code = latency bucket (+FAILED, +UPSTREAM_FAILED); lsum = their latency sum.
        self.pend: list[tuple[bytes | str | None, int, int]] = []
        self.lsum = 0.0
        self.book = RouteBook(rules)
        self.profile = LoadProfile()
        self.folded = self.sec - 1      # seconds up to this one are in the load profiles

    def group(self) -> None:
        """Count the pending requests into the current second: the slot's counters and
        histogram, the release's totals and the routes."""
        p = self.pend
        if not p:
            return
        self.pend = []
        self.totals.sum += self.lsum
        self.lsum = 0.0
        c, t, cb, hist, hb, th = self.counts, self.tcounts, self.cbase, self.hist, self.hbase, self.thist
        seen = Counter(p)           # in C: a steady stream has a handful of distinct outcomes
        failed = False
        for (_, status, code), n in seen.items():
            c[cb] += n
            t[0] += n
            if code >= FAILED:
                failed = True
                c[cb + 1] += n
                t[1] += n
                if code >= UPSTREAM_FAILED:
                    c[cb + 2] += n
                    t[2] += n
                    code -= UPSTREAM_FAILED
                else:
                    code -= FAILED
            k = status // 100
            if 0 < k < 6:
                c[cb + 2 + k] += n
                t[2 + k] += n
            hist[hb + code] += n
            th[code] += n
        if failed:
            self.book.add(p, self.sec)          # in order: runs of consecutive failures per route
        else:
            self.book.add_counted(seen, self.sec)

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
        self.pend = []
        self.lsum = 0.0
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
        self.group()                    # whoever reads: the requests not counted yet first
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
