"""The two read-only control-API ops the dashboard added, computed in the daemon (server.py's
handlers call these): `series` (per-second traffic of each slot, for the Traffic page) and
`releases` (what was deployed and from where, for "Redeploy"). They read; they change nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from changeover.monitor.metrics import Recorder
from changeover.monitor.ring import REQ
from changeover.monitor.stats import quantile
from changeover.state import State

MAX_SERIES = 900          # seconds a series request may ask for (the ring holds [monitor] history)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def series(rec: Recorder, state: State, seconds: int) -> dict[str, Any]:
    """Per slot, one point per second: [second, requests, errors, p50 ms, p95 ms, p99 ms].

    `second` is on the recorder's clock (monotonic, stable between calls, so a client can merge
    overlapping answers); `offset` turns it into wall-clock time. Seconds before a slot's current
    release started are left out (the recorder cleared them), the current second is partial.
    """
    seconds = max(1, min(int(seconds), MAX_SERIES))
    now_mono = rec.clock()
    now = int(now_mono)
    out: dict[str, Any] = {}
    for slot in rec.slots():
        s = rec._slots[slot]   # the ring itself: one bucket per second, as the observer reads it
        s.advance(now)
        first = max(now - seconds + 1, int(s.first), s.sec - s.size + 1)
        points: list[list[Any]] = []
        for t in range(first, now + 1):
            counts, hist = s.sums(t, t)
            n = counts[REQ]
            points.append([t, n, counts[REQ + 1], _ms(quantile(hist, n, 0.50)), _ms(quantile(hist, n, 0.95)),
                           _ms(quantile(hist, n, 0.99))])
        out[slot] = {"version": s.version, "points": points}
    wall = time.time()
    since = wall - seconds
    switches = [{"ts": e["ts"], "slot": e["slot"], "why": e.get("why")} for e in state.events(limit=500)
                if e["kind"] == "slot" and e.get("state") == "live" and e["ts"] >= since]
    return {"offset": wall - now_mono, "now": now, "slots": out, "switches": switches[::-1]}


def releases(state: State, limit: int = 200) -> list[dict[str, Any]]:
    """Every release deployed (newest first, one row per version): version, path, when, how its
    latest deployment ended, and whether its directory is still there to deploy from."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for d in state.deployments(limit):
        if d.release_id is None or d.version in seen:
            continue
        rel = state.release(d.release_id)
        if rel is None:
            continue
        seen.add(d.version)
        out.append({"version": rel.version, "path": rel.path, "created_at": rel.created_at,
                    "deployment": d.id, "kind": d.kind, "state": d.state, "exists": Path(rel.path).is_dir()})
    return out
