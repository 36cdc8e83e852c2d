"""Where the embedded proxy sends requests: slots (`UpstreamPool`: blue, green) of app instances
(`Upstream`), each with its idle keep-alive connections (`upstream.UpstreamConn`).

The idle list follows demand: it holds as many connections as the instance's peak concurrency
needed, up to `[proxy] max_idle_per_instance`, so a steady load above any fixed cap never opens and
closes app connections per request (TIME_WAIT, port exhaustion with a remote app). Connections
left over after the load drops are closed once unused for `IDLE_TTL` (`Upstream.trim`, called by
the proxy's sweeper), oldest first: the list is LIFO, so the cold ones are at its bottom.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from changeover.proxy.base import DEFAULT_MAX_IDLE_PER_INSTANCE

if TYPE_CHECKING:
    from changeover.proxy.upstream import UpstreamConn

# an idle app connection unused this long is closed (below most apps' keep-alive timeouts is not
# needed: a request that cannot be replayed only takes a recently used one, see client.py)
IDLE_TTL = 60.0


class Upstream:
    """One app instance (host, port) with its idle keep-alive connections (LIFO: warmest first)."""

    __slots__ = ("host", "idle", "max_idle", "port", "retired")

    def __init__(self, host: str, port: int, max_idle: int = DEFAULT_MAX_IDLE_PER_INSTANCE) -> None:
        self.host = host
        self.port = port
        self.idle: list[UpstreamConn] = []
        self.max_idle = max_idle           # [proxy] max_idle_per_instance
        self.retired = False               # no longer routed to: connections close once released

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.transport.close()

    def trim(self, now: float, ttl: float = IDLE_TTL) -> None:
        """Close the connections idle longer than `ttl` (the pool shrinks back after a peak)."""
        idle = self.idle
        n = 0
        while n < len(idle) and now - idle[n].idle_since > ttl:
            n += 1
        if n:
            cold, self.idle[:n] = idle[:n], []
            for conn in cold:
                conn.transport.close()

    def retire(self) -> None:
        """Removed from its slot (or replaced): close the idle connections now and every busy one
        when its exchange ends, so that the app's graceful shutdown, which waits for its open
        connections, can finish."""
        self.retired = True
        self.close_idle()


class UpstreamPool:
    """A named set of upstreams (blue, green) with its in-flight count for drain()."""

    __slots__ = ("inflight", "name", "rr", "upstreams", "waiters")

    def __init__(self, name: str, upstreams: tuple[Upstream, ...]) -> None:
        self.name = name
        self.upstreams = upstreams
        self.rr = 0
        self.inflight = 0
        self.waiters: list[asyncio.Future[None]] = []

    def pick(self) -> Upstream:
        ups = self.upstreams
        self.rr += 1
        return ups[self.rr % len(ups)]

    def done_one(self) -> None:
        self.inflight -= 1
        if not self.inflight and self.waiters:
            self.done_one_wake()

    def done_one_wake(self) -> None:
        """Nothing in flight any more: wake drain()."""
        if not self.inflight:
            waiters, self.waiters = self.waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
