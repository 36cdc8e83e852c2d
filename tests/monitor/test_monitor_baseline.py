"""The baseline: built from the old slot before the switch, serialisable for a resumed window."""

from __future__ import annotations

import json
import random

from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder
from changeover.monitor.observer import Observer
from changeover.monitor.triggers import Baseline, latency_limit, make_baseline
from tests.monitor.sim import FakeClock, Profile, drive

CFG = MonitorConfig()


def old_slot(clock: FakeClock, seconds: float = 60, rps: float = 50, profile: Profile | None = None,
             seed: int = 1) -> Recorder:
    rec = Recorder(clock=clock)
    rec.set_version("blue", "v1")
    drive(rec, clock, "blue", rps, seconds, profile or Profile(), random.Random(seed))
    return rec


def test_baseline_round_trips_exactly_through_json(clock: FakeClock) -> None:
    b = make_baseline(old_slot(clock), "blue", CFG)
    assert b.requests > 1000 and b.hist
    again = Baseline.from_dict(json.loads(json.dumps(b.to_dict())))
    assert again == b
    assert latency_limit(again, CFG) == latency_limit(b, CFG)


def test_summary_is_rounded_milliseconds(clock: FakeClock) -> None:
    b = make_baseline(old_slot(clock), "blue", CFG)
    s = b.summary()
    assert b.p95 is not None and s["p95"] == round(b.p95 * 1000, 3)
    assert "rejected" not in s


def test_a_window_with_errors_above_the_threshold_is_no_baseline(clock: FakeClock) -> None:
    b = make_baseline(old_slot(clock, profile=Profile(error_rate=0.21)), "blue", CFG)
    assert b.rejected and "errors" in b.rejected and b.summary()["rejected"] == b.rejected
    assert latency_limit(b, CFG) is None


def test_observer_resumes_a_window(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.set_version("green", "v2")
    for _ in range(30):
        rec.record("green", 200, 0.01, False)
    clock.advance(5)
    obs = Observer(CFG, rec, "green", None, clock=clock, elapsed=100.0)
    st = obs.status()
    assert st["elapsed"] == 100.0 and st["remaining"] == CFG.observe - 100.0
    obs.evaluate()
    assert obs.status()["requests"] == 30      # reaches back to the original switch
    obs.cancel("manual")
    assert obs.verdict is not None and obs.verdict.elapsed == 100.0
