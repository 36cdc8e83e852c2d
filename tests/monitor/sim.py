"""A fake clock and a synthetic-traffic driver for the monitor's unit tests (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from changeover.monitor.config import MonitorConfig
from changeover.monitor.metrics import Recorder
from changeover.monitor.observer import Observer
from changeover.monitor.routes import RouteRules
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


@dataclass
class Mix:
    """Requests spread over routes (request line -> share); some routes may answer differently.
    `load` multiplies every latency by a factor of the current req/s: queueing on what both
    slots share (host CPU, database), so it also applies to the paired probes of both slots."""

    routes: dict[str, float] = field(default_factory=dict)
    faults: dict[str, Profile] = field(default_factory=dict)    # by route key: "GET /cart"
    load: Callable[[float], float] = lambda rps: 1.0

    def pick(self, rng: random.Random) -> str | None:
        if not self.routes:
            return None
        x = rng.random() * sum(self.routes.values())
        for line, share in self.routes.items():
            x -= share
            if x <= 0:
                return line
        return next(reversed(self.routes))


ROUTES = RouteRules()   # how the sim finds a request's route for Mix.faults
SHOP = {"GET / HTTP/1.1": 40, "GET /products/{n} HTTP/1.1": 25, "GET /search?q=x HTTP/1.1": 10,
        "GET /static/app.js HTTP/1.1": 12, "POST /login HTTP/1.1": 3, "GET /cart HTTP/1.1": 3,
        "POST /cart HTTP/1.1": 2, "GET /api/orders/{uuid} HTTP/1.1": 5}


def drive(rec: Recorder, clock: FakeClock, slot: str, rps: float | Callable[[float], float], seconds: float,
          profile: Profile, rng: random.Random, observer: Observer | None = None, interval: float = 0.25,
          mix: Mix | None = None, pairs: Profile | None = None, pair_every: float = 0.5,
          ) -> tuple[Fired | None, float]:
    """Send Poisson traffic at `rps` (a number, or a function of seconds since the start) for
    `seconds`, evaluating the observer every `interval`. With `mix`, requests carry a request line
    and routes may have their own profile. With `pairs` (the old release's profile), the observer
    gets a paired probe every `pair_every`: `profile` for the new slot, `pairs` for the old one.
    Returns (first trigger, clock time it fired) or (None, end time)."""
    t0 = clock.t
    end = clock.t + seconds
    rate = rps if callable(rps) else (lambda _t: float(rps))
    mix = mix or Mix()
    next_eval = clock.t + interval
    next_req = clock.t + rng.expovariate(rate(0.0))
    next_pair = clock.t + pair_every if pairs is not None else float("inf")
    while True:
        t = min(next_eval, next_req, next_pair)
        if t > end:
            clock.t = end
            return None, end
        clock.t = t
        factor = mix.load(rate(t - t0))
        if t == next_req:
            line = mix.pick(rng)
            if line is not None:
                line = line.replace("{n}", str(rng.randrange(1, 10_000))).replace(
                    "{uuid}", f"{rng.getrandbits(128):032x}")
            p = mix.faults.get(ROUTES.key(line), profile) if line and mix.faults else profile
            failed = rng.random() < p.error_rate
            req = line.encode() if line else None
            if failed and p.upstream_failures:
                rec.record(slot, 502, rng.uniform(0.0001, 0.002), True, req)
            else:
                rec.record(slot, 500 if failed else 200, p.latency(rng) * factor, False, req)
            next_req = t + rng.expovariate(max(rate(t - t0), 0.01))
        elif t == next_pair:
            assert observer is not None and pairs is not None
            observer.add_pair(profile.latency(rng) * factor, pairs.latency(rng) * factor)
            next_pair = t + pair_every
        else:
            if observer is not None:
                fired = observer.evaluate()
                if fired:
                    return fired, t
            next_eval = t + interval


def switched(cfg: MonitorConfig, clock: FakeClock, rps: float, healthy: Profile, rng: random.Random,
             baseline_seconds: float = 60.0, mix: Mix | None = None,
             ) -> tuple[Recorder, Baseline, Observer]:
    """Blue serves `healthy` traffic for the baseline period, then green goes live."""
    rec = Recorder(history=cfg.history, clock=clock)
    rec.set_version("blue", "v1")
    drive(rec, clock, "blue", rps, baseline_seconds, healthy, rng, mix=mix)
    base = capture_baseline(rec, "blue", baseline_seconds)
    rec.set_version("green", "v2")
    return rec, base, Observer(cfg, rec, "green", base, clock=clock)
