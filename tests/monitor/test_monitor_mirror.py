"""The proxy worker's recorder copied into the daemon's through JSON, as the daemon pulls it."""

from __future__ import annotations

import json
import random
from typing import Any

from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder, load_profile, route_runs, route_windows
from changeover.monitor.routes import RouteRules
from tests.monitor.sim import SHOP, FakeClock, Mix, Profile, drive


def over_the_wire(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))     # what the rpc socket does to it


def same_windows(a: Recorder, b: Recorder, slot: str) -> None:
    for seconds in (1, 5, 10, 60):
        assert a.window(slot, seconds) == b.window(slot, seconds), seconds
    assert a.window_hist(slot, 10)[1] == b.window_hist(slot, 10)[1]


def test_incremental_pulls_reproduce_windows_and_totals(clock: FakeClock) -> None:
    worker, daemon = Recorder(clock=clock), Recorder(clock=clock)
    rng = random.Random(5)
    worker.set_version("blue", "v1")
    since = None
    for step in range(80):                  # pull every 0.25 s while traffic flows
        prof = Profile(error_rate=0.3 if step > 60 else 0.01)
        drive(worker, clock, "blue", 200, 0.25, prof, rng)
        since = mirror.absorb(daemon, over_the_wire(mirror.export(worker, since)))
    same_windows(worker, daemon, "blue")
    assert daemon.version("blue") == "v1"
    assert daemon.consecutive_failures("blue") == worker.consecutive_failures("blue")
    assert daemon.totals() == worker.totals()


def test_new_release_in_a_slot_clears_the_mirror(clock: FakeClock) -> None:
    worker, daemon = Recorder(clock=clock), Recorder(clock=clock)
    rng = random.Random(6)
    worker.set_version("green", "v1")
    drive(worker, clock, "green", 100, 5, Profile(error_rate=1.0), rng)
    since = mirror.absorb(daemon, over_the_wire(mirror.export(worker, None)))
    assert daemon.window("green", 10).errors > 0
    clock.advance(0.3)
    worker.set_version("green", "v2")
    drive(worker, clock, "green", 100, 1, Profile(), rng)
    mirror.absorb(daemon, over_the_wire(mirror.export(worker, since)))
    same_windows(worker, daemon, "green")
    assert daemon.window("green", 10).errors == 0 and daemon.version("green") == "v2"


def test_a_fresh_daemon_adopts_the_whole_history(clock: FakeClock) -> None:
    worker = Recorder(clock=clock)
    rng = random.Random(7)
    drive(worker, clock, "blue", 50, 30, Profile(error_rate=0.05), rng)
    clock.advance(2)                        # quiet seconds at the end
    daemon = Recorder(clock=clock)
    mirror.absorb(daemon, over_the_wire(mirror.export(worker, None)))
    same_windows(worker, daemon, "blue")


def test_routes_and_load_profiles_survive_the_mirror(clock: FakeClock) -> None:
    """Route rows, their runs and the load profiles folded in the daemon equal the worker's."""
    worker, daemon = Recorder(clock=clock), Recorder(clock=clock)
    rng = random.Random(8)
    worker.set_version("blue", "v1")
    mix = Mix(routes=dict(SHOP), faults={"GET /cart": Profile(error_rate=1.0)})
    since = None
    for step in range(120):
        drive(worker, clock, "blue", 80 if step < 60 else 300, 0.25, Profile(), rng, mix=mix)
        since = mirror.absorb(daemon, over_the_wire(mirror.export(worker, since)))
    for seconds in (1, 10, 60):
        assert route_windows(daemon, "blue", seconds) == route_windows(worker, "blue", seconds)
    assert route_runs(daemon, "blue") == route_runs(worker, "blue") and route_runs(worker, "blue")
    clock.advance(1.0)           # the last second is complete: both fold it
    worker.record("blue", 200, 0.01, False)
    mirror.absorb(daemon, over_the_wire(mirror.export(worker, since)))
    assert load_profile(daemon, "blue") == load_profile(worker, "blue")
    assert {lv for lv, *_ in load_profile(worker, "blue")} >= {6, 8}
    assert load_profile(daemon, "blue", "GET /cart") == load_profile(worker, "blue", "GET /cart")


def test_the_daemons_route_patterns_merge_the_workers_keys(clock: FakeClock) -> None:
    worker = Recorder(clock=clock)
    daemon = Recorder(clock=clock, routes=RouteRules(("GET /shop/*",)))
    for name in ("red-shoes", "blue-hat", "green-scarf"):
        for _ in range(10):
            worker.record("green", 200, 0.01, False, f"GET /shop/{name}?ref=x HTTP/1.1\r\n".encode())
    worker.record("green", 500, 0.01, False, b"GET /shop/red-shoes HTTP/1.1\r\n")
    mirror.absorb(daemon, over_the_wire(mirror.export(worker, None)))
    assert [r[:3] for r in route_windows(daemon, "green", 10)] == [("GET /shop/*", 31, 1)]
    assert route_runs(daemon, "green") == {"GET /shop/*": 1}


def test_an_export_without_routes_is_still_absorbed(clock: FakeClock) -> None:
    """Another data plane may send the older shape: no "routes" key at all."""
    worker, daemon = Recorder(clock=clock), Recorder(clock=clock)
    drive(worker, clock, "blue", 50, 5, Profile(), random.Random(9))
    data = over_the_wire(mirror.export(worker, None))
    for s in data["slots"].values():
        del s["routes"]
    mirror.absorb(daemon, data)
    same_windows(worker, daemon, "blue")
    assert route_windows(daemon, "blue", 10) == []
