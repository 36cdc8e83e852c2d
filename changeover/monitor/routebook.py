"""Per-route per-second counts of one slot, and the load profiles of a release.

A slot's requests are also counted per route (routes.py makes the key). The proxy's hot path
only appends a reference to the request line, its status and latency bucket (metrics.Recorder);
they are grouped here when the second ends, when the buffer fills or when someone reads, counted
first (ring.py), so a stream of alike requests costs a route lookup per distinct outcome.

Route rows are sparse (only seconds in which the route had requests) and kept for
ROUTE_HISTORY seconds: enough for the long error window (6 x window) and the latency windows.

A LoadProfile is what a release did per load level over its life: the latency histogram, request
and error counts of every complete second, added to the level of that second's request count
(the slot's, so a route is profiled by the load on the whole slot). When a level has collected
PROFILE_SECONDS seconds, its counts are halved, so the profile leans to the recent past.
"""

from __future__ import annotations

from collections.abc import Mapping

from changeover.monitor.buckets import NBUCKETS
from changeover.monitor.routes import CACHE, OTHER, RouteRules

ROUTE_HISTORY = 120           # seconds of per-route rows kept
PROFILE_SECONDS = 600         # seconds per load level before its counts are halved
FAILED, UPSTREAM_FAILED = 80, 160  # added to a pending request's latency bucket (< 80 buckets)
R = 3                         # row layout: requests, errors, upstream failures, then the histogram


def level_of(requests: int) -> int:
    """Load level of a second with `requests` requests: the octave [2^k, 2^(k+1))."""
    return requests.bit_length() - 1


class LoadProfile:
    """level -> [seconds, requests, errors, histogram] of complete seconds."""

    __slots__ = ("levels",)

    def __init__(self) -> None:
        self.levels: dict[int, list[int]] = {}

    def add(self, level: int, req: int, err: int, hist: list[int], hoff: int) -> None:
        lv = self.levels.get(level)
        if lv is None:
            lv = self.levels[level] = [0] * (3 + NBUCKETS)
        lv[0] += 1
        lv[1] += req
        lv[2] += err
        for b in range(NBUCKETS):
            n = hist[hoff + b]
            if n:
                lv[3 + b] += n
        if lv[0] >= PROFILE_SECONDS:
            for i in range(3, 3 + NBUCKETS):
                lv[i] //= 2
            lv[0] //= 2
            lv[2] //= 2
            lv[1] = sum(lv[3:])

    def snapshot(self) -> list[tuple[int, int, int, int, list[int]]]:
        """[(level, seconds, requests, errors, histogram)] ascending by level."""
        return [(k, v[0], v[1], v[2], v[3:]) for k, v in sorted(self.levels.items()) if v[1]]


class RouteBook:
    """The routes of one slot's current release."""

    __slots__ = ("cur", "cur_sec", "index", "lines", "names", "profiles", "rows", "rules", "runs", "totals")

    def __init__(self, rules: RouteRules) -> None:
        self.rules = rules
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self.rows: list[dict[int, list[int]]] = []
        self.runs: list[int] = []
        self.profiles: list[LoadProfile] = []
        self.totals: list[list[int]] = []          # cumulative rows of complete seconds (/metrics)
        self.cur: list[list[int] | None] = []      # each route's row of cur_sec, once touched
        self.cur_sec = -1
        self.lines: dict[bytes, int] = {}          # b"GET /a/1" -> route index, bounded

    def route(self, key: str) -> int:
        i = self.index.get(key)
        if i is None:
            named = len(self.names) - (OTHER in self.index)
            if key != OTHER and named >= self.rules.max_routes - 1:   # "(other)" is one of them
                return self.route(OTHER)
            i = self.index[key] = len(self.names)
            self.names.append(key)
            self.rows.append({})
            self.runs.append(0)
            self.profiles.append(LoadProfile())
            self.totals.append([0] * (R + NBUCKETS))
            self.cur.append(None)
        return i

    def row(self, i: int, sec: int) -> list[int]:
        if sec != self.cur_sec:
            self.cur_sec = sec
            self.cur = [None] * len(self.names)
        r = self.cur[i]
        if r is None:
            r = self.rows[i].get(sec)
            if r is None:
                r = self.rows[i][sec] = [0] * (R + NBUCKETS)
            self.cur[i] = r
        return r

    def line_route(self, req: bytes | str) -> int:
        """The route index of a request ("GET /a/1?x=2 HTTP/1.1\r\n..."), through a bounded
        cache of what the route depends on (b"GET /a/1")."""
        if type(req) is not bytes:
            req = str(req).encode("latin-1")
        sp = req.find(b" ")
        end = req.find(b" ", sp + 1)
        if end < 0:
            end = len(req)
        q = req.find(b"?", sp, end)
        line = req[:end if q < 0 else q]
        lines = self.lines
        i = lines.get(line)
        if i is None:
            i = self.route(self.rules.key(line))
            if len(lines) >= CACHE:
                lines.clear()       # a path scan: start over rather than grow
            lines[line] = i
        return i

    def add_counted(self, seen: Mapping[tuple[bytes | str | None, int, int], int], sec: int) -> None:
        """Group counted requests without a failure among them into second `sec`:
        (request, status, latency bucket) -> how many."""
        runs = self.runs
        for (req, _, code), n in seen.items():
            if req is None:
                continue
            i = self.line_route(req)
            r = self.row(i, sec)
            r[0] += n
            r[R + code] += n
            runs[i] = 0

    def add(self, pend: list[tuple[bytes | str | None, int, int]], sec: int) -> None:
        """Group requests in the order they ended into second `sec`: (request, status, code),
        code = latency bucket, +FAILED when the request failed, +UPSTREAM_FAILED when the
        upstream did. The order keeps each route's run of consecutive failures."""
        runs = self.runs
        for req, _, code in pend:
            if req is None:
                continue
            i = self.line_route(req)
            r = self.row(i, sec)
            r[0] += 1
            if code >= FAILED:
                r[1] += 1
                runs[i] += 1
                if code >= UPSTREAM_FAILED:
                    r[2] += 1
                    code -= UPSTREAM_FAILED
                else:
                    code -= FAILED
            else:
                runs[i] = 0
            r[R + code] += 1

    def put(self, name: str, sec: int, counts: list[int], hist: list[tuple[int, int]]) -> None:
        """Write a mirrored row (replacing what a previous pull sent for that second)."""
        i = self.route(name)
        r = [0] * (R + NBUCKETS)
        r[:R] = counts[:R]
        for b, c in hist:
            r[R + b] = c
        self.rows[i][sec] = r
        self.cur_sec = -1

    def fold(self, sec: int, level: int | None) -> None:
        """Second `sec` is complete: into the totals, and into the profiles at `level` (None:
        not a load sample, e.g. the release's partial first second)."""
        for i, rows in enumerate(self.rows):
            r = rows.get(sec)
            if r is not None and r[0]:
                if level is not None:
                    self.profiles[i].add(level, r[0], r[1], r, R)
                tot = self.totals[i]
                for k, n in enumerate(r):
                    if n:
                        tot[k] += n

    def prune(self, now: int) -> None:
        cut = now - ROUTE_HISTORY
        for rows in self.rows:
            old = [t for t in rows if t < cut]
            for t in old:
                del rows[t]

    def window(self, i: int, first: int, last: int, latency: bool = True) -> tuple[int, int, list[int]]:
        """(requests, errors, histogram) of route i over seconds first..last inclusive; the
        histogram stays empty unless `latency`."""
        req = err = 0
        hist = [0] * NBUCKETS if latency else []
        for t, r in self.rows[i].items():
            if first <= t <= last:
                req += r[0]
                err += r[1]
                if latency:
                    for b in range(NBUCKETS):
                        n = r[R + b]
                        if n:
                            hist[b] += n
        return req, err, hist
