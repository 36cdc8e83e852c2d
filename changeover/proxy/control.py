"""The proxy-control protocol: the one seam between the daemon and whatever carries the traffic.

The daemon talks only to a `ProxyControl`. Three implementations sit behind it:

- `proxy.remote.ProxyProcess`  the embedded proxy worker (a process of its own, JSON over a unix socket);
- `proxy.haproxy_engine.HAProxyControl`  HAProxy in master-worker mode, driven through its runtime API;
- `proxy.fake.FakeControl`  in memory, for in-process tests of the pipeline and recovery.

Every call is off the request path. A switch is one call, acknowledged only once new requests
go to the new slot. `metrics(since)` returns per-second buckets in the shape
`monitor.mirror.export` produces, so the monitor, `status`, `top` and `/metrics` read every
engine the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from changeover.proxy.base import ProxySettings

# Bumped whenever an op, an argument or a result of the control protocol changes: a daemon and a
# proxy worker of different protocol versions refuse to talk (a clear error, never a misread).
PROXY_PROTOCOL = 4

Engine = Literal["embedded", "haproxy"]
ENGINES: tuple[str, ...] = ("embedded", "haproxy")


class ProxyControl(Protocol):
    """What the daemon needs from a data plane. Slot names are "blue" and "green"."""

    settings: ProxySettings  # the [proxy] settings it is (to be) run with; a handover applies new ones
    pid: int | None          # the process carrying traffic (HAProxy's master), for `status`
    port: int | None         # the port it listens on (useful when [proxy] listen has port 0)

    async def ensure(self, initial: dict[str, Any] | None = None) -> str:
        """Adopt a running data plane or start one; returns "adopted" or "started".
        `initial` is `daemon.recovery.routing()`: slots, versions and the live slot, loaded
        before the data plane accepts its first connection."""

    async def ping(self) -> dict[str, Any] | None:
        """{"pid", "port", "live", "settings", "protocol"} while it answers, else None."""

    @property
    def settings_differ(self) -> bool:
        """The adopted data plane runs with other [proxy] settings than the config now has."""

    async def live(self) -> str | None:
        """The slot new requests go to now, as the data plane itself reports it."""

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        """Declare or replace a slot's upstreams; routes nothing to it by itself."""

    async def set_version(self, slot: str, version: str | None) -> None:
        """The release a slot runs (labels metrics)."""

    async def remove_slot(self, slot: str) -> None:
        """Forget a slot that is not live; its idle upstream connections are closed."""

    async def switch(self, slot: str | None) -> dict[str, Any]:
        """Atomically send new requests to `slot` (None: 503 for everyone)."""

    async def drain(self, slot: str, timeout: float) -> bool:
        """Wait until the slot has nothing in flight; at the timeout cut what is left.
        True when it drained cleanly."""

    async def metrics(self, since: Any = None) -> dict[str, Any]:
        """Per-slot per-second buckets newer than `since` (see monitor.mirror)."""

    async def handover(self, initial: dict[str, Any],
                       configure: Callable[[Any], Awaitable[None]]) -> None:
        """Replace the running data plane (new code, new settings) without dropping a request."""

    async def shutdown(self) -> None:
        """Stop the data plane (`changeover down`), removing its sockets."""


@runtime_checkable
class RouteControl(Protocol):
    """What `changeover drill` needs on top of `ProxyControl` (the embedded proxy and the fake
    have it; a data plane without it cannot run a drill)."""

    async def set_route(self, route: str, slot: str | None, token: str | None = None,
                        fault: dict[str, float] | None = None) -> None:
        """Point the private route `route` ("drill") at `slot` for requests carrying
        `X-Changeover-Drill: <token>`; `fault` {"status": 500} or {"delay": seconds} is applied
        by the data plane to that route's requests. slot None closes the route."""


@runtime_checkable
class TunnelDrainControl(Protocol):
    """A data plane that tells tunnels from requests when it drains (the embedded proxy): the
    daemon then waits for a slot's requests only, and the tunnels get the drain limit."""

    async def drain_requests(self, slot: str, timeout: float) -> dict[str, Any]:
        """Wait until the slot's HTTP requests are done (at the timeout cut what is left); tunnels
        still open are closed at the drain limit, `timeout` from now (a WebSocket with 1001).
        Returns {"clean", "tunnels", "websockets", "limit_in"} (proxy.ops.DrainResult)."""


@runtime_checkable
class HealthControl(Protocol):
    """A data plane that answers the load balancer's health check (`[proxy] health_path`)."""

    async def set_health(self, ok: bool, reason: str = "") -> None:
        """Whether this host serves what it should (a fleet host in sync): 200 or 503."""


@runtime_checkable
class TrafficControl(Protocol):
    """A data plane that can pause traffic and serve a maintenance page (`changeover pause`,
    `changeover maintenance`); the embedded proxy and the fake have it."""

    async def pause(self, timeout: float, max_held: int) -> dict[str, Any]:
        """Hold new requests (not forwarded, not failed) in arrival order, up to `max_held`
        (beyond: 503 with Retry-After), until `resume()` or `timeout` seconds, when the data plane
        resumes by itself. Returns the mode (proxy.hold.Gate.mode())."""

    async def resume(self) -> int:
        """End the pause: the held requests go to the live slot in arrival order. Returns how many."""

    async def maintenance(self, on: bool, page: bytes | None = None, retry_after: int = 30) -> dict[str, Any]:
        """On: every public request is answered 503 with `page` (None: a built-in page),
        Retry-After and Cache-Control: no-store; requests in flight finish. Returns the mode."""

    async def mode(self) -> dict[str, Any] | None:
        """The mode the data plane is in now (None: it does not answer)."""
