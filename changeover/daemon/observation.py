"""The observation window of one deployment: the monitor's Observer, with its start, length and
baseline written to the state when it opens, so a daemon restarted during the window resumes it
(for what remains, with the baseline it had) instead of forgetting it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from changeover.config import Config
from changeover.daemon.model import StepKind
from changeover.daemon.probes import make_probes
from changeover.daemon.slots import SlotManager
from changeover.daemon.steps import StepRunner
from changeover.daemon.telemetry import Telemetry
from changeover.monitor import triggers
from changeover.monitor.observer import Observer
from changeover.state import State
from changeover.state_schema import Release

log = logging.getLogger("changeover.observe")


class Observation:
    def __init__(self, config: Config, state: State, slots: SlotManager, telemetry: Telemetry, release: Release,
                 target: str, previous: str | None, proxy_url: str) -> None:
        self.config = config
        self.state = state
        self.slots = slots
        self.telemetry = telemetry
        self.release = release
        self.target = target
        self.previous = previous
        self.proxy_url = proxy_url
        self.observer: Observer | None = None
        self._stopped: tuple[str, dict[str, Any]] | None = None

    def stop(self, reason: str, evidence: dict[str, Any]) -> None:
        """End the window now (promote, manual rollback): run() returns a verdict naming `reason`."""
        self._stopped = (reason, evidence)
        if self.observer is not None:
            self.observer.cancel(reason, evidence)

    async def run(self, steps: StepRunner, dep_id: int, resume: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The verdict (a dict, ok or not), or None when there is nothing to observe."""
        cfg = self.config.monitor
        if cfg.observe <= 0:
            await steps.note("observe", "observation disabled ([monitor] observe = 0)")
            return None
        if self.previous is None or not self.slots.warm(self.previous):
            await steps.note("observe", "nothing to roll back to (first release or no warm standby)")
            return None
        elapsed = 0.0
        if resume is not None:
            # Wall-clock time, because the monotonic clock of the daemon that wrote it may be gone.
            elapsed = max(0.0, time.time() - float(resume["started_at"]))
            seconds = float(resume.get("seconds", cfg.observe))
            cfg = dataclasses.replace(cfg, observe=seconds)
            baseline = triggers.Baseline.from_dict(resume["baseline"]) if resume.get("baseline") else None
            if elapsed >= seconds:
                await steps.note("observe", f"the window ended while the daemon was away ({seconds:g}s)")
                return {"ok": True, "elapsed": elapsed, "reason": "", "message": ""}
        else:
            # Read the data plane's counters now: the slot was just given a new release, and the
            # observer must not judge it on the previous occupant's numbers.
            await self.telemetry.pull()
            # Per load level over the old release's recent life; a window with errors is no baseline.
            baseline = triggers.make_baseline(self.telemetry.recorder, self.previous, self.config.monitor)
            self.state.set_window(dep_id, {"started_at": time.time(), "seconds": cfg.observe,
                                           "baseline": baseline.to_dict() if baseline is not None else None,
                                           "target": self.target, "previous": self.previous})
        probes = make_probes(self.config, self.slots, self.release, self.target, self.proxy_url)
        observer = Observer(cfg, self.telemetry.recorder, self.target, baseline, probes, elapsed=elapsed)
        self.observer = observer
        if self._stopped is not None:
            observer.cancel(*self._stopped)
        self.telemetry.observing = observer
        self.telemetry.set_deploy_state("observing")

        async def watch() -> dict[str, Any]:
            return (await observer.run()).to_dict()

        def detail(v: dict[str, Any]) -> str:
            if v["ok"]:
                return f"healthy for {v['elapsed']:.1f}s"
            return f"{v['reason']}: {v['message']}"

        left = cfg.observe - elapsed
        name = f"observe {self.target} ({cfg.observe:g}s)" if resume is None else \
            f"observe {self.target} (resumed: {left:.0f}s of {cfg.observe:g}s left)"
        try:
            return await steps.run(StepKind.OBSERVE, name, watch, detail=detail)
        finally:
            self.observer = None
            self.telemetry.observing = None
            self.telemetry.set_deploy_state("idle")
