"""End to end through the real embedded proxy: real app servers on loopback, real HTTP load, the
recorder on the proxy's hot path, an observer judging green, and a switch back to blue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import httpx
import pytest

from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder
from changeover.monitor.observer import Observer, Probes, Verdict
from changeover.monitor.triggers import CONSECUTIVE_FAILURES, ERROR_RATE, LATENCY, capture_baseline
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from tests.monitor.app import App, load

# Real time on a real proxy: judged latency must not compete with the parallel part of the
# suite for the CPU (`make unit` runs these alone, after it).
pytestmark = pytest.mark.serial

CFG = MonitorConfig(observe=2.0, latency_window=1.0, latency_min_samples=30, baseline=1.0)


@dataclass
class Outcome:
    verdict: Verdict
    onset_to_verdict: float
    onset_to_blue: float        # until a request through the proxy is answered by blue again


async def deploy(fault: str | None, cfg: MonitorConfig = CFG, fault_after: float = 0.3,
                 background_errors: float = 0.0, concurrency: int = 4) -> Outcome:
    rec = Recorder()
    proxy = EmbeddedProxy(ProxySettings(listen="127.0.0.1:0"), rec)
    blue = await App(error_rate=background_errors, seed=1).start()
    green = await App(error_rate=background_errors, seed=2).start()
    await proxy.start()
    proxy.set_slot("blue", [("127.0.0.1", blue.port)])
    proxy.set_slot("green", [("127.0.0.1", green.port)])
    rec.set_version("blue", "v1")
    rec.set_version("green", "v2")
    proxy.switch("blue")
    url = f"http://127.0.0.1:{proxy.port}/"
    stop = asyncio.Event()
    loader = asyncio.create_task(load(url, stop, concurrency=concurrency, pause=0.004))
    client = httpx.AsyncClient(timeout=2)

    async def synthetic() -> None:
        await client.get(url + "smoke")

    try:
        await asyncio.sleep(cfg.baseline)
        baseline = capture_baseline(rec, "blue", cfg.baseline)
        proxy.switch("green")
        obs = Observer(cfg, rec, "green", baseline, Probes(synthetic=synthetic))
        onset = time.monotonic() + fault_after

        async def break_green() -> None:
            await asyncio.sleep(fault_after)
            if fault == "errors":
                green.error_rate = 1.0
            elif fault == "latency":
                green.delay = 0.2
            elif fault == "down":
                await green.close()

        breaker = asyncio.create_task(break_green())
        verdict = await obs.run()
        at_verdict = time.monotonic()
        if not verdict.ok:
            proxy.switch("blue")           # what the daemon does on a trigger
        # the first answer after the switch back comes from blue
        assert (await client.get(url)).status_code == 200 or background_errors
        back = time.monotonic()
        await breaker
        return Outcome(verdict, at_verdict - onset, back - onset)
    finally:
        stop.set()
        await loader
        await client.aclose()
        await proxy.close()
        await blue.close()
        await green.close()


def test_release_failing_every_request_is_rolled_back_within_a_second() -> None:
    out = asyncio.run(deploy("errors"))
    # either trigger is right for a release failing everything: which one sees it first depends
    # on how many requests a busy machine makes in the first second
    assert not out.verdict.ok and out.verdict.reason in (CONSECUTIVE_FAILURES, ERROR_RATE), out.verdict
    assert out.onset_to_verdict <= 1.0, out
    assert out.onset_to_blue <= 2.0, out
    assert out.verdict.evidence["version"] == "v2"


def test_dead_upstream_is_rolled_back() -> None:
    out = asyncio.run(deploy("down"))
    assert not out.verdict.ok and out.verdict.reason in (CONSECUTIVE_FAILURES, ERROR_RATE), out.verdict
    assert out.onset_to_verdict <= 1.0, out


def test_added_latency_is_rolled_back() -> None:
    # closed-loop clients slow down with the app: enough of them keep 1 s windows above min samples
    out = asyncio.run(deploy("latency", replace(CFG, observe=6.0), fault_after=0.0, concurrency=24))
    assert not out.verdict.ok and out.verdict.reason == LATENCY, out.verdict
    assert min(out.verdict.evidence["p95_ms"]) > 150


def test_healthy_release_with_background_errors_is_kept() -> None:
    out = asyncio.run(deploy(None, background_errors=0.01))
    assert out.verdict.ok, out.verdict
