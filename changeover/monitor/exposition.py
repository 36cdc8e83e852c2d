"""GET /metrics in Prometheus exposition format, read straight from the recorder's counters.

A custom prometheus-client Collector turns the recorder's cumulative per-(slot, version) totals
into metric families at scrape time, so the proxy's hot path never calls prometheus-client.
The endpoint is a tiny asyncio HTTP server on the daemon's own event loop: the counters are
plain lists written by the same thread, so a scrape reads a consistent view without locks
(a WSGI server on another thread would read them mid-update).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from changeover.errors import ChangeoverError
from changeover.monitor.buckets import BOUNDS, BUCKETS_PER_OCTAVE
from changeover.monitor.metrics import Recorder, route_totals
from changeover.monitor.ring import CLASS0, CLASSES, ERR, UPSTREAM
from changeover.monitor.routebook import R

log = logging.getLogger("changeover.metrics")

# Exported histogram bounds: every 4th internal bound (powers of two from 0.1 ms to ~52 s). Each
# is an exact internal bound, so the cumulative counts are exact; 21 series instead of 79.
EXPORTED = tuple(range(0, len(BOUNDS), BUCKETS_PER_OCTAVE))
HEAD_TIMEOUT = 5.0
MAX_HEAD = 16 * 1024


def _le(v: float) -> str:
    return f"{v:.6g}"


class ChangeoverCollector(Collector):
    """Request metrics from the recorder plus deploy facts the daemon sets with small setters."""

    def __init__(self, recorder: Recorder, routes: bool = False) -> None:
        """routes: also export per-route series ([monitor] route_metrics; at most max_routes
        per slot and release, complete seconds only)."""
        self.recorder = recorder
        self.routes = routes
        self.live: str | None = None
        self.state = "idle"
        self._states: set[str] = {"idle"}
        self.rollbacks: dict[str, int] = {}
        self._sources: list[Callable[[], Iterable[Metric]]] = []

    # -- setters for the daemon ---------------------------------------------------------------
    def set_live(self, slot: str | None) -> None:
        self.live = slot

    def set_deploy_state(self, state: str) -> None:
        self.state = state
        self._states.add(state)

    def count_rollback(self, reason: str) -> None:
        self.rollbacks[reason] = self.rollbacks.get(reason, 0) + 1

    def add_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Extra metric families another part of the daemon computes at scrape time (the fleet
        agent's figures). A source that fails is logged and left out; the scrape still answers."""
        self._sources.append(source)

    # -- scrape -------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        totals = self.recorder.totals()
        req = CounterMetricFamily("changeover_requests", "Proxied requests by status class.",
                                  labels=["slot", "version", "code"])
        err = CounterMetricFamily("changeover_request_errors",
                                  "Requests counted as failures: 5xx sent to clients or upstream failures.",
                                  labels=["slot", "version"])
        up = CounterMetricFamily("changeover_upstream_failures",
                                 "Requests whose upstream connection failed (refused, reset, timeout).",
                                 labels=["slot", "version"])
        lat = HistogramMetricFamily("changeover_request_duration_seconds",
                                    "Time from request to response head, as seen by the proxy.",
                                    labels=["slot", "version"])
        for slot, version, counts, hist, total_sum in totals:
            for k, name in enumerate(CLASSES, 1):
                req.add_metric([slot, version, name], counts[CLASS0 + k])
            err.add_metric([slot, version], counts[ERR])
            up.add_metric([slot, version], counts[UPSTREAM])
            lat.add_metric([slot, version], _buckets(hist), total_sum)
        yield from (req, err, up, lat)
        if self.routes:
            yield from self._routes()

        live = GaugeMetricFamily("changeover_live_slot", "1 for the slot receiving traffic.",
                                 labels=["slot", "version"])
        for slot in sorted({*self.recorder.slots(), *([self.live] if self.live else [])}):
            live.add_metric([slot, self.recorder.version(slot)], 1.0 if slot == self.live else 0.0)
        yield live
        state = GaugeMetricFamily("changeover_deploy_state", "1 for the current deploy state.",
                                  labels=["state"])
        for s in sorted(self._states):
            state.add_metric([s], 1.0 if s == self.state else 0.0)
        yield state
        rb = CounterMetricFamily("changeover_rollbacks", "Rollbacks by reason.", labels=["reason"])
        for reason, n in sorted(self.rollbacks.items()):
            rb.add_metric([reason], n)
        yield rb
        for source in list(self._sources):
            try:
                extra = list(source())
            except Exception:
                log.exception("metrics source %r failed", source)
                continue
            yield from extra


    def _routes(self) -> Iterator[Metric]:
        labels = ["slot", "version", "route"]
        req = CounterMetricFamily("changeover_route_requests", "Proxied requests per route.", labels=labels)
        err = CounterMetricFamily("changeover_route_errors", "Failed requests per route (5xx or upstream).",
                                  labels=labels)
        lat = HistogramMetricFamily("changeover_route_duration_seconds", "Time to response head per route.",
                                    labels=labels)
        for slot, version, route, row in route_totals(self.recorder):
            req.add_metric([slot, version, route], row[0])
            err.add_metric([slot, version, route], row[1])
            lat.add_metric([slot, version, route], _buckets(row[R:]), None)
        yield from (req, err, lat)


def _buckets(hist: list[int]) -> list[tuple[str, float]]:
    cum, i, out = 0, 0, []
    for b in EXPORTED:
        while i <= b:
            cum += hist[i]
            i += 1
        out.append((_le(BOUNDS[b]), float(cum)))
    out.append(("+Inf", float(sum(hist))))
    return out


def make_registry(collector: Collector, *, process: bool = True) -> CollectorRegistry:
    """A registry with our collector (and the daemon's process metrics: memory, CPU, fds)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    if process:
        ProcessCollector(registry=reg)
    return reg


def _response(status: str, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


async def _handle(registry: CollectorRegistry, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    try:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(_response("400 Bad Request", "text/plain", b"bad request\n"))
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        if path != "/metrics":
            writer.write(_response("404 Not Found", "text/plain", b"not found: try /metrics\n"))
        elif method not in ("GET", "HEAD"):
            writer.write(_response("405 Method Not Allowed", "text/plain", b"GET /metrics\n"))
        else:
            encoder, content_type = choose_encoder(accept)
            writer.write(_response("200 OK", content_type, encoder(registry), method == "HEAD"))
        await writer.drain()
    except ConnectionError:
        pass
    except Exception:  # a scrape must never take the daemon down
        log.exception("metrics request failed")
        with contextlib.suppress(Exception):
            writer.write(_response("500 Internal Server Error", "text/plain", b"internal error\n"))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_metrics(host: str, port: int, collector: Collector | CollectorRegistry) -> asyncio.Server:
    """Serve GET /metrics on host:port (port 0: any free port; read it from server.sockets).
    Close with `server.close(); await server.wait_closed()`."""
    registry = collector if isinstance(collector, CollectorRegistry) else make_registry(collector)
    try:
        return await asyncio.start_server(lambda r, w: _handle(registry, r, w), host, port,
                                          limit=MAX_HEAD)
    except OSError as e:
        raise ChangeoverError(
            f"cannot serve /metrics on {host}:{port}: {e.strerror or e} "
            "(change [monitor] metrics_listen, or set it to '' to disable)") from None
