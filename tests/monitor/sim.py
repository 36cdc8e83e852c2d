"""A fake clock and a synthetic-traffic driver for the monitor's unit tests (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder
from changeover.monitor.observer import Observer
from changeover.monitor.triggers import Baseline, Fired, capture_baseline


class FakeClock:
    def __init__(self, t: float = 10_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class Profile:
    """How the app answers: error probability and a latency sampler."""

    error_rate: float = 0.0
    latency: Callable[[random.Random], float] = lambda rng: rng.lognormvariate(-4.6, 0.4)  # ~10 ms
    upstream_failures: bool = False   # errors are connect failures (502 made by the proxy)


def drive(rec: Recorder, clock: FakeClock, slot: str, rps: float, seconds: float, profile: Profile,
          rng: random.Random, observer: Observer | None = None, interval: float = 0.25,
          ) -> tuple[Fired | None, float]:
    """Send Poisson traffic at `rps` for `seconds`, evaluating the observer every `interval`.
    Returns (first trigger, clock time it fired) or (None, end time)."""
    end = clock.t + seconds
    next_eval = clock.t + interval
    next_req = clock.t + rng.expovariate(rps)
    while True:
        t = min(next_eval, next_req)
        if t > end:
            clock.t = end
            return None, end
        clock.t = t
        if t == next_req:
            failed = rng.random() < profile.error_rate
            if failed and profile.upstream_failures:
                rec.record(slot, 502, rng.uniform(0.0001, 0.002), True)
            else:
                rec.record(slot, 500 if failed else 200, profile.latency(rng), False)
            next_req = t + rng.expovariate(rps)
        else:
            if observer is not None:
                fired = observer.evaluate()
                if fired:
                    return fired, t
            next_eval = t + interval


def switched(cfg: MonitorConfig, clock: FakeClock, rps: float, healthy: Profile, rng: random.Random,
             baseline_seconds: float = 60.0) -> tuple[Recorder, Baseline, Observer]:
    """Blue serves `healthy` traffic for the baseline period, then green goes live."""
    rec = Recorder(history=cfg.history, clock=clock)
    rec.set_version("blue", "v1")
    drive(rec, clock, "blue", rps, baseline_seconds, healthy, rng)
    base = capture_baseline(rec, "blue", baseline_seconds)
    rec.set_version("green", "v2")
    return rec, base, Observer(cfg, rec, "green", base, clock=clock)
