"""Fair comparisons for the latency trigger: the old release at a comparable load, and a rank
test on probes sent to both slots at the same moment.

Load-matched reference. A latency window of the new release has a load (its req/s). Its
reference is the old release's latency at the lowest level of its load profile that is at least
that busy and is a usable baseline (enough samples, error rate not above `error_rate`). A busier
level is a lenient reference (busier is slower), never a stricter one, so a rise in load alone
cannot make identical code look slow. Without a profile, the pre-switch window stands in as one
level. When the new release carries more load than the old one ever did (a ramp during the
window), nothing is comparable: that window's latency is judged only by the paired probes.

Paired probes. During the window the observer sends the same probe request to both slots'
instances at the same moment. Load on what both share (host CPU, database, a dependency) slows
both; a regression in the new code slows only the new one. The pairs are compared with a
one-sided Wilcoxon signed-rank test (the paired form of the Mann-Whitney U rank test: no
assumption on the shape of latency distributions, and each pair's shared moment cancels out),
corrected for the number of looks in the observation window. Caveat: the
old slot is idle, so a new slot that queues requests under a load the old one never carried
looks slower too; that is why the probes also need the effect to be as large as the latency
limit, and the real traffic's tail must be above the busiest usable level's limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from changeover.monitor.baseline import Level, Sparse, dense, usable
from changeover.monitor.config import MonitorConfig
from changeover.monitor.routebook import level_of
from changeover.monitor.stats import quantile


@dataclass(frozen=True)
class Reference:
    """What a latency window is compared with."""

    p95: float
    source: str              # "load_profile" or "window"
    level: int               # the baseline level used
    rps: float               # the old release's load at that level
    requests: int            # its samples

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "level": self.level, "rps": round(self.rps, 2),
                "requests": self.requests, "p95_ms": round(self.p95 * 1000, 3)}


def rps_level(rps: float) -> int:
    return level_of(max(1, int(rps)))


def candidates(levels: tuple[Level, ...], window: tuple[int, int, Sparse, float] | None,
               cfg: MonitorConfig) -> list[tuple[int, float, int, Sparse, str]]:
    """Usable baseline levels as (level, rps, requests, hist, source), ascending."""
    out = [(lv.level, lv.rps, lv.requests, lv.hist, "load_profile") for lv in levels
           if usable(lv.requests, lv.errors, cfg)]
    if not out and window is not None:
        req, err, hist, seconds = window
        if usable(req, err, cfg) and seconds > 0:
            out.append((rps_level(req / max(seconds, 1.0)), req / max(seconds, 1.0), req, hist, "window"))
    return sorted(out)


def reference(levels: tuple[Level, ...], window: tuple[int, int, Sparse, float] | None, rps: float,
              cfg: MonitorConfig) -> tuple[Reference | None, Reference | None]:
    """(the reference for a window at `rps`, or None when the new release is busier than the old
    one ever was; the busiest usable level, or None when there is no usable baseline at all)."""
    cands = candidates(levels, window, cfg)
    if not cands:
        return None, None

    def ref(c: tuple[int, float, int, Sparse, str]) -> Reference | None:
        p95 = quantile(dense(c[3]), c[2], 0.95)
        return None if p95 is None else Reference(p95, c[4], c[0], c[1], c[2])

    want = rps_level(rps)
    busiest = ref(cands[-1])
    for c in cands:
        if c[0] >= want:
            return ref(c), busiest
    return None, busiest


def limit_for(p95: float, cfg: MonitorConfig) -> float:
    return max(p95 * cfg.latency_ratio, p95 + cfg.latency_min_increase)


@dataclass(frozen=True)
class RankTest:
    n: int                   # pairs that differ (ties dropped)
    w: float                 # signed-rank sum of the pairs where the new slot was slower
    z: float
    p: float                 # one-sided: the new slot slower than the old one
    median_new: float
    median_old: float

    def to_dict(self) -> dict[str, Any]:
        return {"test": "wilcoxon_signed_rank", "pairs": self.n, "w": round(self.w, 1),
                "z": round(self.z, 3), "p": float(f"{self.p:.3g}"),
                "median_new_ms": round(self.median_new * 1000, 3),
                "median_old_ms": round(self.median_old * 1000, 3)}


def signed_rank(pairs: list[tuple[float, float]]) -> RankTest | None:
    """One-sided Wilcoxon signed-rank test on paired probes (new, old): is the new slot slower?
    A rank test, like Mann-Whitney U, but on the differences of each pair: what both slots
    shared at that moment (a load spike, a busy database) cancels out. Normal approximation
    with tie correction; None without pairs."""
    if not pairs:
        return None
    diffs = [a - b for a, b in pairs if a != b]
    n = len(diffs)
    new, old = [a for a, _ in pairs], [b for _, b in pairs]
    if not n:
        return RankTest(0, 0.0, 0.0, 0.5, _median(new), _median(old))
    order = sorted(range(n), key=lambda i: abs(diffs[i]))
    ranks = [0.0] * n
    ties = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(diffs[order[j + 1]]) == abs(diffs[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    w = sum(r for r, d in zip(ranks, diffs, strict=True) if d > 0)
    var = n * (n + 1) * (2 * n + 1) / 24 - ties / 48
    z = (w - n * (n + 1) / 4) / math.sqrt(var) if var > 0 else 0.0
    return RankTest(n, w, z, 1 - NormalDist().cdf(z), _median(new), _median(old))


def _median(v: list[float]) -> float:
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
