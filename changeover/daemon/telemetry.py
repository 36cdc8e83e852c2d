"""The daemon's view of traffic and its voice: the metrics mirror, `/metrics`, notifications.

A Recorder is mirrored from the data plane a few times a second; it feeds the observer, `status`
and the Prometheus endpoint. Notifications go through a Notifier built from the `[notify]` the
current deploy read, so a webhook added to the file is used by the next deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from changeover.errors import ChangeoverError, ConfigError
from changeover.monitor import mirror
from changeover.monitor.config import MonitorConfig
from changeover.monitor.exposition import ChangeoverCollector, serve_metrics
from changeover.monitor.metrics import Recorder
from changeover.monitor.notify import Notifier
from changeover.monitor.routes import RouteRules
from changeover.proxy.control import ProxyControl

log = logging.getLogger("changeover.telemetry")
PULL_INTERVAL = 0.1       # how often the daemon mirrors the data plane's counters
STATUS_WINDOW = 10.0      # seconds of traffic `changeover status` summarises


class Telemetry:
    def __init__(self, monitor: MonitorConfig, proxy: ProxyControl, file: str = "") -> None:
        self.monitor = monitor
        self.proxy = proxy
        self.file = file
        # Route patterns group the mirrored per-route rows; per-route Prometheus series are opt-in.
        self.recorder = Recorder(history=monitor.history, routes=RouteRules(monitor.routes, monitor.max_routes))
        self.collector = ChangeoverCollector(self.recorder, routes=monitor.route_metrics)
        self.notifier = Notifier(monitor.notify)
        self.metrics_port: int | None = None
        self.observing: Any = None        # the running Observer, for `status` (set by the pipeline)
        self._since: int | None = None
        self._puller: asyncio.Task[None] | None = None
        self._metrics_server: asyncio.AbstractServer | None = None

    async def start(self, live: str | None) -> None:
        await self.pull()
        self._puller = asyncio.get_running_loop().create_task(self._pull_loop(), name="metrics-mirror")
        self.collector.set_live(live)
        self.collector.set_deploy_state("idle")
        addr = self.monitor.metrics_address
        if addr is not None:
            try:
                self._metrics_server = await serve_metrics(addr[0], addr[1], self.collector)
            except OSError as e:
                raise ConfigError(f"cannot listen on {self.monitor.metrics_listen}: {e.strerror or e}",
                                  file=self.file, key="monitor.metrics_listen") from None
            self.metrics_port = int(self._metrics_server.sockets[0].getsockname()[1])

    def configure(self, monitor: MonitorConfig) -> None:
        """Take the [monitor]/[notify] a deploy just read (the endpoint itself moves on restart)."""
        if monitor.notify != self.monitor.notify:
            old = self.notifier
            self.notifier = Notifier(monitor.notify)
            asyncio.get_running_loop().create_task(old.close())
        self.monitor = monitor

    async def close(self) -> None:
        if self._puller is not None:
            self._puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._puller
        if self._metrics_server is not None:
            self._metrics_server.close()
        await self.notifier.close()

    # -- the mirror ------------------------------------------------------------------------------
    def reset_mirror(self) -> None:
        """A new data plane counts from zero: read it from the start."""
        self._since = None

    async def pull(self) -> None:
        data = await self.proxy.metrics(self._since)
        self._since = mirror.absorb(self.recorder, data)

    async def _pull_loop(self) -> None:
        while True:
            await asyncio.sleep(PULL_INTERVAL)
            try:
                await self.pull()
            except ChangeoverError as e:
                log.warning("reading the proxy's metrics failed: %s", e)
                await asyncio.sleep(1)

    def live_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: self.recorder.window(s, STATUS_WINDOW).to_dict() for s in self.recorder.slots()}
        if self.observing is not None:
            out["observing"] = self.observing.status()
        if self.metrics_port is not None:
            addr = self.monitor.metrics_address
            out["endpoint"] = f"http://{addr[0] if addr else '127.0.0.1'}:{self.metrics_port}/metrics"
        return out

    # -- what the pipeline reports -----------------------------------------------------------------
    async def notify(self, event: str, payload: dict[str, Any]) -> None:
        try:
            self.notifier.notify(event, payload)
        except Exception:  # a notification must never block a deploy or a rollback
            log.exception("notification %s failed", event)

    def set_live(self, slot: str | None) -> None:
        self.collector.set_live(slot)

    def set_deploy_state(self, state: str) -> None:
        self.collector.set_deploy_state(state)

    def count_rollback(self, reason: str, live: str | None) -> None:
        self.collector.count_rollback(reason.split(":", 1)[0])
        self.collector.set_live(live)
