"""Copying a Recorder's per-second buckets from the proxy worker into the daemon.

The proxy worker records every request (it sees them); the daemon judges (it runs the observer,
/metrics and `status`). A few times a second the daemon asks the worker for the seconds that
changed since the last pull and writes them into a Recorder of its own, bucket for bucket, so
every window query, trigger and Prometheus total reads the same numbers the proxy counted.
Both processes read CLOCK_MONOTONIC, which is shared system-wide, so bucket times line up.

The export, as JSON (another data plane, e.g. an HAProxy log reader, may produce it too):

    {"now": int second,
     "slots": {slot: {"version", "first", "run", "sec",
                      "rows": [[second, counts[8], [[bucket, n], ...]], ...],
                      # optional, per route (routes.py keys, e.g. "GET /cart/{id}"):
                      "routes": {key: {"run": consecutive failures now,
                                       "rows": [[second, [requests, errors, upstream failures],
                                                 [[bucket, n], ...]], ...]}}}},
     "totals": [[slot, version, counts[8], [[bucket, n], ...], latency sum], ...]}

A slot without "routes" simply has no route judgement. The daemon maps route keys through its
own `[monitor] routes` patterns (two keys may land in one route: their rows are added) and folds
every complete second into the release's load profile.
"""

from __future__ import annotations

from typing import Any

from changeover.monitor.buckets import NBUCKETS
from changeover.monitor.metrics import Recorder
from changeover.monitor.ring import C, SlotMetrics, Totals
from changeover.monitor.routebook import R


def export(rec: Recorder, since: int | None) -> dict[str, Any]:
    """The seconds from `since` (inclusive) to now of every slot, histograms sparse; None: all."""
    now = int(rec.clock())
    slots: dict[str, Any] = {}
    for name, s in rec._slots.items():
        s.advance(now)
        s.group()
        first = max(s.sec - s.size + 1, int(s.first), since if since is not None else -(2**62))
        rows = []
        for t in range(first, s.sec + 1):
            i = t % s.size
            counts = s.counts[i * C:(i + 1) * C]
            if not counts[0]:
                continue
            h = s.hist[i * NBUCKETS:(i + 1) * NBUCKETS]
            rows.append([t, counts, [[b, n] for b, n in enumerate(h) if n]])
        routes: dict[str, Any] = {}
        book = s.book
        for i, key in enumerate(book.names):
            rrows = [[t, r[:R], [[b, n] for b, n in enumerate(r[R:]) if n]]
                     for t, r in sorted(book.rows[i].items()) if t >= first]
            if rrows or book.runs[i]:
                routes[key] = {"run": book.runs[i], "rows": rrows}
        slots[name] = {"version": s.version, "first": s.first, "run": s.run, "sec": s.sec, "rows": rows,
                       "routes": routes}
    totals = [[slot, ver, t.counts, [[b, n] for b, n in enumerate(t.hist) if n], t.sum]
              for (slot, ver), t in rec._totals.items()]
    return {"now": now, "slots": slots, "totals": totals}


def absorb(rec: Recorder, data: dict[str, Any]) -> int:
    """Write an export into `rec`. Returns the second to ask from next time (re-sends the current
    second, which was still filling up)."""
    for name, d in data["slots"].items():
        s = rec._slots.get(name) or rec._add(name)
        s.group()
        if s.version != d["version"] or s.first != d["first"]:
            s.clear(float(d["first"]))
            s.version = d["version"]
        s.advance(int(d["sec"]))
        s.run = int(d["run"])
        for t, counts, hist in d["rows"]:
            i = int(t) % s.size
            s.counts[i * C:(i + 1) * C] = counts
            h = [0] * NBUCKETS
            for b, n in hist:
                h[b] = n
            s.hist[i * NBUCKETS:(i + 1) * NBUCKETS] = h
        _absorb_routes(s, d.get("routes") or {})
        s.fold(int(d["sec"]) - 1)       # seconds before the worker's current one are complete
        s.book.prune(int(d["sec"]))
    rec._totals.clear()
    for slot, ver, counts, hist, total in data["totals"]:
        t = Totals()
        t.counts[:] = counts
        for b, n in hist:
            t.hist[b] = n
        t.sum = float(total)
        rec._totals[(slot, ver)] = t
    for name, s in rec._slots.items():
        tot = rec._totals.get((name, s.version))
        if tot is not None:
            s.totals, s.tcounts, s.thist = tot, tot.counts, tot.hist
    return int(data["now"])


def _absorb_routes(s: SlotMetrics, routes: dict[str, Any]) -> None:
    """Overwrite the route rows sent (re-sent seconds are replaced, not added), after mapping
    the worker's keys through this recorder's patterns."""
    book = s.book
    merged: dict[tuple[str, int], tuple[list[int], dict[int, int]]] = {}
    runs: dict[str, int] = {}
    for key, d in routes.items():
        name = book.rules.rekey(str(key))
        runs[name] = max(runs.get(name, 0), int(d.get("run", 0)))
        for t, counts, hist in d.get("rows", []):
            m = merged.setdefault((name, int(t)), ([0] * R, {}))
            for k in range(R):
                m[0][k] += int(counts[k])
            for b, n in hist:
                m[1][int(b)] = m[1].get(int(b), 0) + int(n)
    for (name, t), (counts, hist) in merged.items():
        book.put(name, t, counts, sorted(hist.items()))
    for name, run in runs.items():
        book.runs[book.route(name)] = run
