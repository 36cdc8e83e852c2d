"""The embedded data plane: an HTTP/1.1 reverse proxy on asyncio/uvloop with per-request routing.

`switch()` replaces one reference (`live_slot`); every request reads it when its head is complete,
so keep-alive clients move to the new slot on their next request while requests already sent
finish on the old one. `drain()` waits for a slot's in-flight requests and tunnels to end, and
closes what is left at the timeout. The wire work lives in `client.py` (client side),
`upstream.py` (app side) and `http1.py` (head rewriting, chunked framing).

Timeouts are deadlines on each client connection, checked by one sweeper task a few times a
second: the hot path never creates a timer, task or coroutine when a pooled connection exists.

Proxy replacement without a gap (SO_REUSEPORT, `retire()`): `handover.py`.

The drill route (`changeover drill`): a request carrying `X-Changeover-Drill: <token>` with the
drill's token goes to `drill_slot` instead of the live slot; any other value is a public request
(the header is dropped either way: the app never sees it). A fault set on the route makes the
proxy answer its requests with an error itself, or hold them `delay` seconds before forwarding,
recorded against the drill slot as usual, so the monitor's triggers can be rehearsed on any app.
The header is one of the names the head scan already looks for: a request without it pays nothing.

The health check (`[proxy] health_path`, for a load balancer in front): answered by the proxy,
never forwarded; 200 while the daemon says the host is in sync and a slot is live, else 503.

Pause and maintenance (`changeover pause`, `changeover maintenance on`): `proxy/hold.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from changeover.errors import ChangeoverError, ConfigError
from changeover.proxy import handover
from changeover.proxy.base import ProxySettings, RequestRecorder
from changeover.proxy.client import ClientConn
from changeover.proxy.exchange import S_TUNNEL, Exchange
from changeover.proxy.handover import RETIRE_IDLE_GRACE, RETIRE_LISTEN_SETTLE, RETIRE_TICK  # noqa: F401 (re-exported)
from changeover.proxy.hold import Gate
from changeover.proxy.ops import DrainResult
from changeover.proxy.tls import TlsEdge
from changeover.proxy.upstream import Upstream, UpstreamPool

if TYPE_CHECKING:
    from changeover.proxy.routes import HostTable

log = logging.getLogger("changeover.proxy")

# the accept queue: a burst of thousands of new connections (a load balancer's pool refilling)
# must not overflow it into SYN retries of 1 s and more; the kernel caps it at net.core.somaxconn
LISTEN_BACKLOG = 65535


class ListenError(ChangeoverError, OSError):
    """The listen address cannot be bound: a ChangeoverError for the CLI, and still an OSError
    (errno, strerror) for callers that handle socket errors."""

    def __init__(self, errno: int, strerror: str, listen: str, key: str = "proxy.listen") -> None:
        OSError.__init__(self, errno, strerror)
        self.listen = listen
        self.key = key                     # the config key naming the address

    def __str__(self) -> str:
        return f"proxy cannot listen on {self.listen}: {self.strerror}"


class EmbeddedProxy:
    """The proxy itself (run by proxy/worker.py, driven through proxy/remote.py); see the module docstring."""

    def __init__(self, settings: ProxySettings, recorder: RequestRecorder | None = None, *,
                 reuse_port: bool = False) -> None:
        self.settings = settings
        self.recorder = recorder
        self.reuse_port = reuse_port
        self.retiring = False              # read once per response head: answer with Connection: close
        self.slots: dict[str, UpstreamPool] = {}
        self.live_slot: UpstreamPool | None = None
        self.clients: set[Exchange] = set()
        self.tasks: set[asyncio.Task[None]] = set()   # upstream connects in progress
        self.adopting: set[asyncio.Task[None]] = set()   # connections taken from a retired listener
        self.now = 0.0                     # the sweeper's clock; deadlines are set against it
        self.server: asyncio.Server | None = None
        self.running = False
        self._port = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._fwd_cache: dict[bytes, bytes] = {}
        self._trust_cache: dict[bytes, bool] = {}
        self.trusted_networks = _networks(settings.trusted_proxies)
        self.partial_heads: dict[bytes, int] = {}    # client address -> connections with a head unfinished
        self.head_bytes_scanned = 0        # bytes of unfinished heads looked at (linear in what arrives)
        self._loop: asyncio.AbstractEventLoop | None = None
        shortest = min(settings.header_timeout, settings.body_timeout, settings.idle_timeout,
                       settings.response_timeout)
        self._tick = max(0.01, min(0.25, shortest / 5))
        # the drill route: see the module docstring
        self.drill_slot: UpstreamPool | None = None
        self.drill_token = b""
        self.drill_status = 0              # fault: answer every drill request with this status
        self.drill_delay = 0.0             # fault: hold every drill request this long
        # the health check: path (b"" = off) and what the daemon last said about the host
        self.health_path = settings.health_path.encode()
        self.health_ok = True
        self.health_reason = ""
        # pause and maintenance (proxy/hold.py): `gate` is None unless one is on, one check per request
        self.gate: Gate | None = None
        self.traffic = Gate(self)
        # a shared front (proxy/front.py): the Host header picks the project; None: one project
        self.sites: HostTable[Any] | None = None
        if settings.hosts and not settings.shared:   # a project's own proxy: only its host names
            from changeover.proxy.routes import HostTable as Table
            self.sites = Table()
            self.sites.set_hosts(self, settings.hosts)
        # [proxy.tls] (proxy/tls.py): the HTTPS listener, and what the HTTP one answers itself
        # (ACME tokens, the redirect to https); `edge` is None unless one of those is on
        tls = settings.tls
        self.tls = TlsEdge(self, tls) if tls is not None else None
        self.edge = self.tls.plain_request if self.tls is not None and tls is not None and (
            tls.https_redirect or tls.challenge_dir) else None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "EmbeddedProxy.start() was not called"
        return self._loop

    async def start(self) -> None:
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time()
        try:
            port = self.settings.port
        except (ValueError, IndexError):
            raise ChangeoverError(f"proxy listen address {self.settings.listen!r}: expected host:port") from None
        try:
            self.server = await self._loop.create_server(
                lambda: ClientConn(self), self.settings.host or None, port, backlog=LISTEN_BACKLOG,
                reuse_address=True, reuse_port=self.reuse_port)
        except OSError as e:
            raise ListenError(e.errno or 0, e.strerror or str(e), self.settings.listen) from None
        self._port = int(self.server.sockets[0].getsockname()[1]) if self.server.sockets else port
        if self.tls is not None:
            try:
                await self.tls.start(self._loop, self.reuse_port)
            except BaseException:
                self.server.close()
                self.server = None
                raise
        if self.reuse_port:
            # a retired predecessor leaves its steering program on the group: back to the
            # kernel's spreading by hash over every listener of the address
            handover.unsteer(self)
        self.retiring = False
        for slot in self.slots.values():    # started again after close(): pool again
            for up in slot.upstreams:
                up.retired = False
        self.running = True
        self._sweeper = self._loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        """The bound port (useful with listen port 0); still known while and after retiring."""
        if not self.running:
            raise ChangeoverError("the proxy is not listening")
        return self._port

    async def close(self) -> None:
        if not self.running:
            return
        self.running = False
        server, self.server = self.server, None
        if server is not None:
            server.close()
        if self.tls is not None:
            await self.tls.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in [*self.tasks, *self.adopting]:
            task.cancel()
        for client in list(self.clients):
            if client.state == S_TUNNEL:
                client.tunnel_cut("shutdown", wait=False)   # a WebSocket at a frame boundary gets 1001
            client.transport.close()
        self.clients.clear()
        for slot in self.slots.values():
            for up in slot.upstreams:
                up.retire()                # the idle ones, and those settling after a HEAD
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    # -- hand-over to a successor (proxy/handover.py) -------------------------------------------
    async def retire(self, timeout: float, first: int = 1, count: int = 1) -> int:
        """Hand the listen address over to a successor bound with SO_REUSEPORT: see handover.py.
        Returns the number of connections cut at `timeout`; `close()` is still to be called."""
        return await handover.retire(self, timeout, first, count)

    def unsteer(self) -> None:
        """Remove the steering program a retired predecessor group left (proxy/workers.py)."""
        handover.unsteer(self)

    # -- slots ---------------------------------------------------------------------------------
    def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        if not slot or not isinstance(slot, str):
            raise ChangeoverError(f"slot name must be a non-empty string, got {slot!r}")
        ups: list[Upstream] = []
        old = self.slots.get(slot)
        kept: dict[tuple[str, int], Upstream] = {(u.host, u.port): u for u in old.upstreams} if old else {}
        for item in upstreams:
            try:
                host, port = item
            except (TypeError, ValueError):
                raise ChangeoverError(f"slot {slot}: upstream {item!r} is not (host, port)") from None
            if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 < port < 65536:
                raise ChangeoverError(f"slot {slot}: upstream {item!r} is not (host, port 1-65535)")
            existing = kept.pop((host, port), None) if (host, port) in kept else None
            ups.append(existing or Upstream(host, port, self.settings.max_idle_per_instance))
        for gone in kept.values():
            gone.retire()                  # replaced: its connections close as their requests end
        if old is None:
            self.slots[slot] = UpstreamPool(slot, tuple(ups))
        else:
            old.upstreams = tuple(ups)     # in place: keeps the in-flight count and drain waiters

    def remove_slot(self, slot: str) -> None:
        s = self.slots.get(slot)
        if s is None:
            return
        if s is self.live_slot:
            raise ChangeoverError(f"slot {slot} is live; switch away from it before removing it")
        if s is self.drill_slot:
            self.set_route("drill", None)  # a drill copy that is stopped takes its route with it
        del self.slots[slot]
        for up in s.upstreams:
            up.retire()                    # idle ones now, busy ones as their requests end

    def switch(self, slot: str | None) -> None:
        if slot is None:
            self.live_slot = None
            return
        s = self.slots.get(slot)
        if s is None:
            raise ChangeoverError(f"unknown slot {slot!r} (known: {', '.join(sorted(self.slots)) or 'none'})")
        self.live_slot = s                 # the one reference every new request reads

    @property
    def live(self) -> str | None:
        s = self.live_slot
        return None if s is None else s.name

    # -- the drill route and the health check ------------------------------------------------------
    def set_route(self, route: str, slot: str | None, token: str | None = None,
                  fault: dict[str, float] | None = None) -> None:
        """Point the private route `route` (only "drill" exists) at `slot` for requests carrying
        `token`, with an optional fault ({"status": 500} or {"delay": seconds}); slot None closes it."""
        if route != "drill":
            raise ChangeoverError(f"unknown route {route!r} (known: drill)")
        if slot is None:
            self.drill_slot, self.drill_token, self.drill_status, self.drill_delay = None, b"", 0, 0.0
            return
        s = self.slots.get(slot)
        if s is None:
            raise ChangeoverError(f"unknown slot {slot!r} (known: {', '.join(sorted(self.slots)) or 'none'})")
        if not token or len(token) < 16:
            raise ChangeoverError("the drill route needs a token of at least 16 characters")
        fault = fault or {}
        status = int(fault.get("status", 0))
        delay = float(fault.get("delay", 0.0))
        if (status and not 500 <= status <= 599) or not 0 <= delay <= 60 or set(fault) - {"status", "delay"}:
            raise ChangeoverError(f"fault {fault!r}: expected {{'status': 500-599}} or {{'delay': 0-60 seconds}}")
        self.drill_token, self.drill_status, self.drill_delay = token.encode(), status, delay
        self.drill_slot = s

    def drill_match(self, token: bytes) -> UpstreamPool | None:
        """The drill slot for a request that carried `token`, or None (a public request)."""
        s = self.drill_slot
        if s is None or not hmac.compare_digest(token, self.drill_token):
            return None
        return s

    @property
    def drill(self) -> dict[str, object] | None:
        s = self.drill_slot
        if s is None:
            return None
        return {"slot": s.name, "status": self.drill_status, "delay": self.drill_delay}

    def set_health(self, ok: bool, reason: str = "") -> None:
        self.health_ok, self.health_reason = bool(ok), str(reason)

    def health(self) -> tuple[bool, dict[str, object]]:
        live = self.live_slot
        ok, reason = self.health_ok, self.health_reason
        if ok and (live is None or not live.upstreams):
            ok, reason = False, "nothing is live on this host"
        return ok, {"ok": ok, "live": live.name if live else None, **({"reason": reason} if reason else {})}

    def health_response(self, head_only: bool, close: bool) -> bytes:
        ok, body = self.health()
        data = json.dumps(body).encode() + b"\n"
        head = (b"HTTP/1.1 200 OK\r\n" if ok else b"HTTP/1.1 503 Service Unavailable\r\n") + \
            b"Content-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: " + \
            str(len(data)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n"
        return head if head_only else head + data

    def inflight(self, slot: str) -> int:
        """Requests and tunnels open to the slot (for tests and the drain)."""
        s = self.slots.get(slot)
        return 0 if s is None else s.inflight

    async def drain(self, slot: str, timeout: float) -> bool:
        s = self.slots.get(slot)
        if s is None:
            return True
        clean = True
        if s.inflight:
            waiter: asyncio.Future[None] = self.loop.create_future()
            s.waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(waiter)
            except TimeoutError:
                clean = False
                for client in list(self.clients):
                    if client.req_slot is s:
                        client.drain_abort()
                log.warning("drain of slot %s timed out after %.1fs; closed what was left", slot, timeout)
        if s is not self.live_slot:
            for up in s.upstreams:
                up.close_idle()
        return clean

    async def drain_requests(self, slot: str, timeout: float) -> DrainResult:
        """Like `drain()`, but tunnels do not hold it up: it returns once the slot's HTTP requests
        are done (a WebSocket can stay open for hours), and the tunnels still open get the drain
        limit, `timeout` from now, when they are closed (a WebSocket with 1001), unless they end
        first. {"clean": no request was cut, "tunnels": open, "websockets": of which WebSocket,
        "limit_in": seconds until the limit}."""
        s = self.slots.get(slot)
        loop = self.loop
        limit = loop.time() + timeout
        clean = True
        while s is not None and s.inflight:
            tunnels = [c for c in self.clients if c.req_slot is s and c.state == S_TUNNEL]
            if len(tunnels) >= s.inflight:
                for c in tunnels:
                    c.tunnel_limit(limit)
                n, ws = len(tunnels), sum(1 for c in tunnels if c.ws_in is not None)
                left = max(0.0, limit - loop.time())
                log.info("drain of slot %s: %d tunnel(s) left (%d WebSocket), not waiting for them; "
                         "closed at the drain limit in %.1fs", slot, n, ws, left)
                return {"clean": True, "tunnels": n, "websockets": ws, "limit_in": left}
            now = loop.time()
            if now >= limit:
                clean = False
                for client in list(self.clients):
                    if client.req_slot is s:
                        client.drain_abort()
                log.warning("drain of slot %s timed out after %.1fs; closed what was left", slot, timeout)
                break
            waiter: asyncio.Future[None] = loop.create_future()
            s.waiters.append(waiter)
            # woken when nothing is in flight; looked at again every tick for "only tunnels left"
            await asyncio.wait((waiter,), timeout=min(RETIRE_TICK, limit - now))
            if not waiter.done():
                with contextlib.suppress(ValueError):
                    s.waiters.remove(waiter)
        if s is not None and s is not self.live_slot:
            for up in s.upstreams:
                up.close_idle()
        return {"clean": clean, "tunnels": 0, "websockets": 0, "limit_in": 0.0}

    # -- used by the connections -----------------------------------------------------------------
    def record(self, slot: str, status: int, seconds: float, upstream_failed: bool,
               request: bytes | None = None) -> None:
        if self.recorder is not None:
            try:
                self.recorder.record(slot, status, seconds, upstream_failed, request)
            except Exception:              # a monitor bug must never break traffic
                log.exception("request recorder failed")

    def trusted(self, ip: bytes) -> bool:
        """Whether a peer is one of [proxy] trusted_proxies (its X-Forwarded-* are believed)."""
        known = self._trust_cache.get(ip)
        if known is None:
            try:
                addr = ipaddress.ip_address(ip.decode())
            except ValueError:
                known = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                known = any(addr in net for net in self.trusted_networks)
            if len(self._trust_cache) < 4096:
                self._trust_cache[ip] = known
        return known

    def forwarded_headers(self, ip: bytes) -> bytes:
        fwd = self._fwd_cache.get(ip)
        if fwd is None:
            fwd = b"X-Forwarded-For: " + ip + b"\r\nX-Forwarded-Proto: http\r\nVia: 1.1 changeover\r\n"
            if len(self._fwd_cache) < 4096:
                self._fwd_cache[ip] = fwd
        return fwd

    async def _sweep(self) -> None:
        loop = self.loop
        while True:
            await asyncio.sleep(self._tick)
            now = self.now = loop.time()
            for slot in self.slots.values():
                for up in slot.upstreams:
                    if up.idle:
                        up.trim(now)       # the pool shrinks back once a peak is over
            for client in list(self.clients):
                if client.dkind and client.deadline <= now:
                    try:
                        client.timeout(now)
                    except Exception:
                        log.exception("timeout handling failed")
                        client.transport.abort()


def _networks(cidrs: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{cidr!r} is not an IP network (expected a CIDR like 10.0.0.0/8 or an address)",
                              key="proxy.trusted_proxies") from None
    return tuple(out)
