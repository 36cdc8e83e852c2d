"""The proxy worker's recorder copied into the daemon's through JSON, as the daemon pulls it."""

from __future__ import annotations

import json
import random
from typing import Any

from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from tests.monitor.sim import FakeClock, Profile, drive


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
