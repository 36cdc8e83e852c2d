"""Trigger statistics, driven by synthetic traffic on a fake clock (no sleeping)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder
from changeover.monitor.observer import Observer
from changeover.monitor.triggers import (
    CONSECUTIVE_FAILURES,
    ERROR_RATE,
    LATENCY,
    Baseline,
    capture_baseline,
    check_error_rate,
    wilson_lower,
    z_for,
)
from tests.monitor.sim import FakeClock, Profile, drive, switched

CFG = MonitorConfig()
HEALTHY = Profile()


def onset_to_trigger(rps: float, fault: Profile, seed: int = 1, healthy_for: float = 20.0,
                     cfg: MonitorConfig = CFG, limit: float = 120.0) -> tuple[str, float, dict[str, object]]:
    """Healthy green for `healthy_for`, then `fault`; returns (reason, seconds from onset, evidence)."""
    rng = random.Random(seed)
    clock = FakeClock()
    rec, _, obs = switched(cfg, clock, rps, HEALTHY, rng)
    fired, _ = drive(rec, clock, "green", rps, healthy_for, HEALTHY, rng, obs, interval=cfg.interval)
    assert fired is None, fired
    onset = clock.t
    fired, at = drive(rec, clock, "green", rps, limit, fault, rng, obs, interval=cfg.interval)
    assert fired is not None, "fault never detected"
    return fired.reason, at - onset, fired.evidence


@pytest.mark.parametrize("rps,limit", [(20, 1.2), (50, 0.6), (200, 0.2), (1000, 0.15)])
def test_total_failure_caught_within_a_second(rps: float, limit: float) -> None:
    """consecutive_failures / rps + one evaluation interval: 10 requests and at most 100 ms."""
    for seed in range(5):
        reason, took, ev = onset_to_trigger(rps, Profile(error_rate=1.0), seed=seed,
                                            healthy_for=20.0 + seed * 0.37)
        assert reason == CONSECUTIVE_FAILURES
        assert took <= limit, (rps, took)
        assert ev["consecutive_failures"] >= CFG.consecutive_failures


def test_total_upstream_failure_caught_within_a_second() -> None:
    reason, took, _ = onset_to_trigger(100, Profile(error_rate=1.0, upstream_failures=True))
    assert reason == CONSECUTIVE_FAILURES and took <= 1.0


def test_ten_percent_errors_trip_the_error_rate() -> None:
    reason, took, ev = onset_to_trigger(100, Profile(error_rate=0.10))
    assert reason == ERROR_RATE
    assert took <= CFG.window + 1
    assert ev["errors"] > 0 and ev["lower_bound"] > CFG.error_rate  # type: ignore[operator]
    assert ev["requests"] >= CFG.min_requests and ev["threshold"] == CFG.error_rate  # type: ignore[operator]


def test_half_failing_caught_quickly_by_error_rate() -> None:
    reason, took, _ = onset_to_trigger(100, Profile(error_rate=0.5))
    assert reason == ERROR_RATE and took <= 2.0


def test_added_200ms_latency_trips_latency_after_two_windows() -> None:
    slow = Profile(latency=lambda rng: 0.2 + rng.lognormvariate(-4.6, 0.4))
    reason, took, ev = onset_to_trigger(100, slow)
    assert reason == LATENCY
    # two disjoint windows of latency_window seconds (+1 s of bucket slack each)
    assert took <= CFG.latency_windows * (CFG.latency_window + 1) + 1
    assert all(p > ev["limit_ms"] for p in ev["p95_ms"])  # type: ignore[attr-defined, union-attr]
    assert ev["baseline"]["p95_ms"] < 30 and ev["source"] == "load_profile"  # type: ignore[index]


def test_latency_needs_a_baseline_with_samples(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    rec.set_version("green", "v2")
    thin = Baseline("blue", "v1", 60, 3, 0.0, 0.01, 0.01, 0.01)
    obs = Observer(CFG, rec, "green", thin, clock=clock)
    slow = Profile(latency=lambda rng: 1.0)
    fired, _ = drive(rec, clock, "green", 100, 30, slow, random.Random(1), obs)
    assert fired is None


def test_no_judgement_below_min_requests(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    obs = Observer(CFG, rec, "green", None, clock=clock)
    for _ in range(CFG.consecutive_failures - 1):
        rec.record("green", 500, 0.01, False)   # 9 of 9 failed: not yet enough to judge
    assert obs.evaluate() is None
    rec.record("green", 500, 0.01, False)
    assert obs.evaluate() is not None


def test_traffic_before_the_switch_is_ignored(clock: FakeClock) -> None:
    """Smoke tests against the preview slot failed before the switch: not the observer's business."""
    rec = Recorder(clock=clock)
    rec.set_version("green", "v2")
    for _ in range(50):
        rec.record("green", 500, 0.01, False)
        rec.record("green", 200, 0.01, False)
    clock.advance(3)
    obs = Observer(CFG, rec, "green", None, clock=clock)
    assert obs.evaluate() is None


def test_wilson_bound() -> None:
    z = z_for(0.99)
    assert wilson_lower(0, 0, z) == 0.0
    assert wilson_lower(20, 20, z) > 0.75
    assert wilson_lower(2, 20, z) < 0.05      # 10 % observed on 20 requests: not yet sure
    assert wilson_lower(4, 20, z) > 0.05
    assert wilson_lower(100, 1000, z) > 0.05


def test_error_rate_check_evidence(clock: FakeClock) -> None:
    rec = Recorder(clock=clock)
    for i in range(40):
        rec.record("g", 500 if i % 2 else 200, 0.01, False)
    fired = check_error_rate(rec.window("g", 10), CFG, z_for(CFG.confidence))
    assert fired is not None and "50.0%" in fired.message and fired.evidence["errors"] == 20


# -- no false rollback of a healthy-but-noisy release ---------------------------------------------
def jittery(base: float, sigma: float, spike: float) -> Profile:
    """Lognormal latency plus rare 10x stalls (GC, a slow query), 1 % errors."""
    def lat(rng: random.Random) -> float:
        v = rng.lognormvariate(base, sigma)
        return v * 10 if rng.random() < spike else v
    return Profile(error_rate=0.01, latency=lat)


def healthy_run(seed: int, rps: float, sigma: float, spike: float, observe: float) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    profile = jittery(rng.uniform(-7.0, -2.5), sigma, spike)   # medians from ~1 ms to ~80 ms
    rec, base, obs = switched(CFG, clock, rps, profile, rng)
    fired, _ = drive(rec, clock, "green", rps, observe, profile, rng, obs)
    assert fired is None, (fired, base)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rps=st.sampled_from([3, 10, 25, 60, 150]),
       sigma=st.floats(0.05, 0.8), spike=st.floats(0.0, 0.02))
def test_noisy_healthy_release_never_triggers(seed: int, rps: float, sigma: float, spike: float) -> None:
    healthy_run(seed, rps, sigma, spike, observe=90.0)


@pytest.mark.parametrize("seed,rps", [(11, 20), (12, 400)])
def test_noisy_healthy_release_survives_a_full_window(seed: int, rps: float) -> None:
    healthy_run(seed, rps, 0.6, 0.01, observe=CFG.observe)


def test_capture_baseline_reads_the_old_slot(clock: FakeClock) -> None:
    rng = random.Random(3)
    rec = Recorder(clock=clock)
    rec.set_version("blue", "v1")
    drive(rec, clock, "blue", 50, 30, HEALTHY, rng)
    b = capture_baseline(rec, "blue", 30)
    assert b.slot == "blue" and b.version == "v1" and b.requests > 1000
    assert b.p95 is not None and 0.01 < b.p95 < 0.03
    assert b.summary()["p95"] == round(b.p95 * 1000, 3)


def test_moderate_latency_regression_is_caught() -> None:
    """p95 doubled (not a fixed +200 ms): still over 1.5x with confidence."""
    slower = Profile(latency=lambda rng: 2.0 * rng.lognormvariate(-4.6, 0.4))
    reason, took, _ = onset_to_trigger(100, slower)
    assert reason == LATENCY and took <= 15


def test_ten_percent_errors_at_low_traffic_caught_by_the_long_window() -> None:
    """20 req/s: one 10 s window (200 requests) cannot tell 10 % from 5 % with confidence;
    the 60 s window can."""
    for seed in range(3):
        reason, took, _ = onset_to_trigger(20, Profile(error_rate=0.10), seed=seed)
        assert reason == ERROR_RATE and took <= 60, took
