from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from changeover.monitor.buckets import BOUNDS, NBUCKETS
from changeover.monitor.metrics import Recorder, route_runs, route_windows
from changeover.monitor.stats import WindowStats, quantile
from tests.monitor.sim import FakeClock


def test_window_counts_by_outcome(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.set_version("green", "v2")
    for status in (200, 201, 304, 404, 500, 503):
        rec.record("green", status, 0.01, False)
    rec.record("green", 502, 0.001, True)
    w = rec.window("green", 10)
    assert (w.requests, w.errors, w.upstream_failures) == (7, 3, 1)
    assert w.status == {"1xx": 0, "2xx": 2, "3xx": 1, "4xx": 1, "5xx": 3}
    assert w.error_rate == pytest.approx(3 / 7)
    assert w.version == "v2" and w.slot == "green"


def test_upstream_failure_without_5xx_still_counts_as_error(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.record("blue", 0, 0.001, True)       # client went away after the upstream failed
    w = rec.window("blue", 5)
    assert (w.requests, w.errors, w.upstream_failures) == (1, 1, 1)


def test_sliding_window_forgets_old_seconds(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    for _ in range(30):
        rec.record("blue", 500, 0.01, False)
        clock.advance(1.0)                 # one request a second for 30 s
    assert rec.window("blue", 10).requests in (10, 11)
    clock.advance(5)
    w = rec.window("blue", 10)
    assert w.requests in (5, 6)
    clock.advance(100)
    assert rec.window("blue", 10).requests == 0


def test_gap_longer_than_history_clears_ring(clock: FakeClock) -> None:
    rec = Recorder(history=20, clock=clock)
    rec.record("blue", 200, 0.01, False)
    clock.advance(10_000)
    rec.record("blue", 200, 0.01, False)
    assert rec.window("blue", 20).requests == 1


def test_since_and_offset_make_disjoint_windows(clock: FakeClock) -> None:
    clock.t = 1000.0
    rec = Recorder(clock=clock)
    for sec in range(20):                  # second 1000+k gets k+1 requests
        clock.t = 1000.0 + sec + 0.5
        for _ in range(sec + 1):
            rec.record("g", 200, 0.01, False)
    clock.t = 1019.5
    newest = rec.window("g", 4)             # seconds 1015..1019
    older = rec.window("g", 4, offset=5)    # seconds 1010..1014
    assert newest.requests == sum(range(16, 21))
    assert older.requests == sum(range(11, 16))
    assert older.seconds == pytest.approx(5.0)
    since = rec.window("g", 10, since=1017.2)  # the bucket holding `since` is included whole
    assert since.requests == 18 + 19 + 20
    assert since.seconds == pytest.approx(2.3)


def test_set_version_starts_a_fresh_window_but_keeps_totals(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.set_version("green", "v1")
    for _ in range(9):
        rec.record("green", 500, 0.01, False)
    assert rec.consecutive_failures("green") == 9
    rec.set_version("green", "v1")          # same version: nothing changes
    assert rec.window("green", 10).requests == 9
    rec.set_version("green", "v3")
    assert rec.window("green", 10).requests == 0
    assert rec.consecutive_failures("green") == 0
    rec.record("green", 200, 0.01, False)
    totals = {(s, v): c for s, v, c, _, _ in rec.totals()}
    assert totals[("green", "v1")][0] == 9 and totals[("green", "v3")][0] == 1
    assert rec.version("green") == "v3" and rec.version("nope") == ""
    rec.set_version("green", None)
    assert rec.version("green") == ""


def test_old_version_series_are_pruned(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    for i in range(20):
        rec.set_version("blue", f"v{i}")
        rec.record("blue", 200, 0.01, False)
    versions = [v for s, v, *_ in rec.totals() if s == "blue"]
    assert len(versions) <= 8 and "v19" in versions


def test_consecutive_failures_reset_by_success(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    for _ in range(5):
        rec.record("g", 503, 0.01, False)
    rec.record("g", 404, 0.01, False)       # a 4xx is the client's problem, not a failure
    assert rec.consecutive_failures("g") == 0
    for _ in range(3):
        rec.record("g", 502, 0.01, True)
    assert rec.consecutive_failures("g") == 3
    assert rec.window("g", 1).consecutive_failures == 3


@pytest.mark.parametrize("sigma", [0.2, 0.6, 1.2])
def test_percentiles_track_the_true_distribution(clock: FakeClock, sigma: float) -> None:
    rng = random.Random(7)
    rec = Recorder(clock=clock)
    samples = [rng.lognormvariate(-4.0, sigma) for _ in range(20_000)]
    for i, s in enumerate(samples):
        if i % 2000 == 0:
            clock.advance(1.0)
        rec.record("b", 200, s, False)
    w = rec.window("b", 30)
    samples.sort()
    for q, est in ((0.5, w.p50), (0.95, w.p95), (0.99, w.p99)):
        true = samples[int(q * len(samples))]
        assert est is not None and abs(est / true - 1) < 0.06, (q, est, true)


def test_quantile_edges() -> None:
    hist = [0] * NBUCKETS
    assert quantile(hist, 0, 0.5) is None
    hist[-1] = 10                           # everything slower than the last bound
    assert quantile(hist, 10, 0.99) == BOUNDS[-1]
    hist = [0] * NBUCKETS
    hist[0] = 4                             # below 0.1 ms: linear from zero
    assert quantile(hist, 4, 0.5) == pytest.approx(BOUNDS[0] / 2)


def test_latency_extremes_land_in_edge_buckets(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.record("b", 200, 0.0, False)
    rec.record("b", 200, 1e6, False)
    rec.record("b", 200, math.inf, False)
    (_, _, _, hist, _), = rec.totals()
    assert hist[0] == 1 and hist[-1] == 2


def test_window_of_unknown_slot_is_empty(clock: FakeClock) -> None:
    w = Recorder(clock=clock).window("nobody", 10)
    assert w.requests == 0 and w.p95 is None and w.rps == 0.0


def test_rps_over_covered_time(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    for _ in range(400):
        clock.advance(0.01)                 # 100 req/s for 4 s
        rec.record("b", 200, 0.01, False)
    w = rec.window("b", 10)                 # the slot only existed for 4 s
    assert w.rps == pytest.approx(100, rel=0.05)


def test_backwards_clock_keeps_recording(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.record("b", 200, 0.01, False)
    clock.advance(-5)
    rec.record("b", 200, 0.01, False)
    clock.advance(5)
    assert rec.window("b", 10).requests == 2


def test_stats_round_trip_through_json_dict(clock: FakeClock) -> None:
    import json

    rec = Recorder(clock=clock)
    rec.record("b", 200, 0.01, False)
    w = rec.window("b", 10)
    assert WindowStats.from_dict(json.loads(json.dumps(w.to_dict()))) == w


@settings(max_examples=60, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0, 3.0), st.sampled_from([200, 302, 404, 500, 502]),
                                 st.booleans()), min_size=1, max_size=200),
       seconds=st.integers(1, 30), offset=st.integers(0, 10), tail=st.floats(0, 40))
def test_windows_match_a_naive_model(events: list[tuple[float, int, bool]], seconds: int, offset: int,
                                     tail: float) -> None:
    """The ring agrees with a plain list of (second, failed) for any traffic and window."""
    clock = FakeClock(500.0)
    rec = Recorder(history=60, clock=clock)
    log: list[tuple[int, bool]] = []
    for dt, status, upstream in events:
        clock.advance(dt)
        rec.record("s", status, 0.01, upstream)
        log.append((int(clock.t), upstream or status >= 500))
    clock.advance(tail)
    now = int(clock.t)
    last = now - offset
    first = max(last - seconds, int(500.0))
    inside = [failed for sec, failed in log if first <= sec <= last and sec > now - rec.size]
    w = rec.window("s", seconds, offset=offset)
    assert (w.requests, w.errors) == (len(inside), sum(inside))


@settings(max_examples=60, deadline=None)
@given(events=st.lists(st.tuples(st.floats(0, 0.02), st.sampled_from(["/a", "/b/1", "/b/2", "/c?x=1"]),
                                 st.sampled_from([200, 204, 302, 404, 500, 503]), st.booleans(),
                                 st.sampled_from([0.0004, 0.003, 0.04, 0.9])),
                       min_size=1, max_size=1500))
def test_counted_in_bulk_matches_each_request_counted_alone(
        events: list[tuple[float, str, int, bool, float]]) -> None:
    """Requests are counted in bulk (alike outcomes together, a batch with a failure in order):
    the window, its histogram, the totals, each route and each route's run of consecutive
    failures come out as if every request had been counted on its own."""
    clock = FakeClock(500.0)
    rec = Recorder(history=60, clock=clock)
    rec.set_version("s", "v1")
    statuses: dict[str, int] = {}
    hist = [0] * NBUCKETS
    routes: dict[str, list[int]] = {}
    runs: dict[str, int] = {}
    lsum = 0.0
    for dt, path, status, upstream, seconds in events:
        clock.advance(dt)
        rec.record("s", status, seconds, upstream, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        failed = upstream or status >= 500
        cls = f"{status // 100}xx"
        statuses[cls] = statuses.get(cls, 0) + 1
        b = next(i for i, bound in enumerate(BOUNDS) if seconds <= bound)
        hist[b] += 1
        key = "GET " + path.split("?")[0].replace("/1", "/{id}").replace("/2", "/{id}")
        r = routes.setdefault(key, [0, 0])
        r[0] += 1
        r[1] += failed
        runs[key] = runs.get(key, 0) + 1 if failed else 0
        lsum += seconds
    span = int(clock.t) - 500 + 1
    w, h = rec.window_hist("s", span)
    assert w.requests == len(events)
    assert {k: v for k, v in w.status.items() if v} == statuses
    assert h == hist
    got = {name: [req, err] for name, req, err, _ in route_windows(rec, "s", span)}
    assert got == routes
    assert route_runs(rec, "s") == {k: n for k, n in runs.items() if n}
    [(_, _, counts, thist, total)] = rec.totals()
    assert counts[0] == len(events) and thist == hist and total == pytest.approx(lsum)
