"""Observer.run(): the real asyncio loops with short intervals and probes as the daemon supplies them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder
from changeover.monitor.observer import Observer, Probes, Verdict
from changeover.monitor.triggers import CANCELLED, CONSECUTIVE_FAILURES, CRASH_LOOP, CRITICAL, DATABASE

FAST = MonitorConfig(observe=1.0, interval=0.02, db_probe_interval=0.03, critical_interval=0.03,
                     probe_timeout=0.2, synthetic_rate=100.0, crash_loop_within=10.0)


def observe(probes: Probes, cfg: MonitorConfig = FAST, rec: Recorder | None = None) -> Verdict:
    rec = rec or Recorder()
    return asyncio.run(Observer(cfg, rec, "green", None, probes).run())


def ok_probe(detail: str = "ok"):  # type: ignore[no-untyped-def]
    async def probe() -> tuple[bool, str]:
        return True, detail
    return probe


def test_healthy_window_passes() -> None:
    calls = {"db": 0, "health": 0, "critical": 0}

    async def db() -> tuple[bool, str]:
        calls["db"] += 1
        return True, "select 1: 0.4 ms"

    async def health() -> tuple[bool, str]:
        calls["health"] += 1
        return True, '{"status": "ok", "db": "ok"}'

    async def critical() -> list[tuple[str, bool, str]]:
        calls["critical"] += 1
        return [("redis", True, "PONG"), ("payments", True, "200")]

    async def crashes(since: float) -> int:
        return 0

    t0 = time.monotonic()
    v = observe(Probes(db_probe=db, health_probe=health, critical=critical, crashes=crashes))
    assert v.ok and v.reason == ""
    assert 0.95 <= time.monotonic() - t0 < 3.0
    assert v.elapsed >= FAST.observe
    assert min(calls.values()) >= 5


def test_zero_observe_passes_at_once() -> None:
    v = observe(Probes(), replace(FAST, observe=0.0))
    assert v.ok


def test_database_probe_failing_twice_triggers() -> None:
    async def db() -> tuple[bool, str]:
        return False, "connection refused (127.0.0.1:5432)"

    v = observe(Probes(db_probe=db, health_probe=ok_probe()))
    assert not v.ok and v.reason == DATABASE
    assert v.elapsed < FAST.observe  # before the window could pass
    assert "connection refused" in v.message
    failed = v.evidence["failed"]
    assert failed["db_probe"]["consecutive"] == FAST.probe_failures
    assert "health_probe" not in failed


def test_health_endpoint_db_field_and_exceptions_count() -> None:
    async def health() -> tuple[bool, str]:
        raise OSError("health endpoint said db: down")

    v = observe(Probes(health_probe=health))
    assert v.reason == DATABASE and "OSError: health endpoint said db: down" in v.message


def test_hanging_probe_is_a_failure_and_never_blocks_traffic_triggers() -> None:
    async def hang() -> tuple[bool, str]:
        await asyncio.sleep(3600)
        return True, ""

    v = observe(Probes(db_probe=hang), replace(FAST, probe_timeout=0.05))
    assert v.reason == DATABASE and "no answer within 0.05s" in v.message

    rec = Recorder()
    for _ in range(20):
        rec.record("green", 503, 0.001, True)
    t0 = time.monotonic()
    v = observe(Probes(db_probe=hang, critical=lambda: asyncio.sleep(3600)), FAST, rec)  # type: ignore[arg-type, return-value]
    assert v.reason == CONSECUTIVE_FAILURES and time.monotonic() - t0 < 0.5


def test_one_failure_then_recovery_does_not_trigger() -> None:
    results = iter([(False, "timeout")] + [(True, "ok")] * 10_000)

    async def flaky() -> tuple[bool, str]:
        return next(results)

    assert observe(Probes(db_probe=flaky), replace(FAST, observe=0.4)).ok


def test_critical_service_down() -> None:
    async def critical() -> list[tuple[str, bool, str]]:
        return [("redis", True, "PONG"), ("payments", False, "HTTP 503 from payments:8080/health")]

    v = observe(Probes(critical=critical))
    assert v.reason == CRITICAL
    assert "'payments'" in v.message and "HTTP 503" in v.message
    assert list(v.evidence["failed"]) == ["payments"]


def test_critical_checks_that_raise_count_as_failing() -> None:
    async def critical() -> list[tuple[str, bool, str]]:
        raise RuntimeError("checks misconfigured")

    v = observe(Probes(critical=critical))
    assert v.reason == CRITICAL and "RuntimeError: checks misconfigured" in v.message


def test_crash_loop() -> None:
    seen: list[float] = []
    t_start = time.monotonic()

    async def crashes(since: float) -> int:
        seen.append(since)
        return 3 if len(seen) > 3 else len(seen) - 1

    v = observe(Probes(crashes=crashes))
    assert v.reason == CRASH_LOOP and v.evidence["crashes"] == 3
    assert all(s >= t_start for s in seen)     # never counts crashes from before the switch


def test_synthetic_requests_fill_a_quiet_window() -> None:
    """No real traffic: smoke requests give the triggers samples; a broken release is caught."""
    rec = Recorder()
    sent = 0

    async def synthetic() -> None:
        nonlocal sent
        sent += 1
        rec.record("green", 500, 0.002, False)   # what the proxy records for the smoke request

    t0 = time.monotonic()
    v = observe(Probes(synthetic=synthetic), FAST, rec)
    assert v.reason == CONSECUTIVE_FAILURES
    assert sent >= FAST.consecutive_failures
    assert time.monotonic() - t0 < 0.5


def test_synthetic_pauses_while_real_traffic_suffices() -> None:
    rec = Recorder()
    sent = 0

    async def synthetic() -> None:
        nonlocal sent
        sent += 1

    async def main() -> Verdict:
        obs = Observer(replace(FAST, observe=0.5), rec, "green", None, Probes(synthetic=synthetic))
        for _ in range(FAST.min_requests * 2):
            rec.record("green", 200, 0.002, False)
        return await obs.run()

    assert asyncio.run(main()).ok
    assert sent == 0


def test_cancel_ends_the_window() -> None:
    async def main() -> tuple[Verdict, float]:
        obs = Observer(replace(FAST, observe=60.0), Recorder(), "green", None, Probes(db_probe=ok_probe()))
        t0 = time.monotonic()
        asyncio.get_running_loop().call_later(0.1, obs.cancel, "manual", {"by": "alice", "why": "typo"})
        v = await obs.run()
        obs.cancel("again")                       # the first verdict stands
        assert obs.verdict == v and obs.status()["verdict"]["reason"] == "manual"
        return v, time.monotonic() - t0

    v, took = asyncio.run(main())
    assert not v.ok and v.reason == "manual" and v.evidence == {"by": "alice", "why": "typo"}
    assert took < 10  # not the 60 s window


def test_cancel_before_run() -> None:
    async def main() -> Verdict:
        obs = Observer(FAST, Recorder(), "green", None)
        obs.cancel()
        return await obs.run()

    v = asyncio.run(main())
    assert v.reason == CANCELLED and not v.ok


def test_a_bug_in_the_loop_surfaces_instead_of_hanging() -> None:
    async def main() -> Verdict:
        obs = Observer(FAST, Recorder(), "green", None)
        obs.evaluate = lambda: 1 / 0  # type: ignore[assignment, method-assign, return-value]
        return await obs.run()

    with pytest.raises(ZeroDivisionError):
        asyncio.run(main())


def test_status_reports_progress() -> None:
    rec = Recorder()
    obs = Observer(FAST, rec, "green", None)
    rec.record("green", 200, 0.01, False)
    assert obs.evaluate() is None
    st = obs.status()
    assert st["slot"] == "green" and st["requests"] == 1 and st["verdict"] is None
    assert 0 < st["remaining"] <= FAST.observe
