"""The data-plane interface shared by the embedded proxy, the HAProxy driver and the fake.

The daemon talks to a data plane through `proxy.control.ProxyControl`; this module holds what the
implementations share: the [proxy] settings, and the `RequestRecorder` the monitor receives one
`record()` call through per proxied request.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from changeover.proxy.tls_settings import TlsSettings

# Named defaults; config.py maps [proxy] onto ProxySettings with these.
DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0          # whole request head must arrive within this (slowloris)
DEFAULT_BODY_TIMEOUT = 30.0            # max gap between body chunks from the client
DEFAULT_IDLE_TIMEOUT = 60.0            # keep-alive connection with no request
DEFAULT_TUNNEL_IDLE_TIMEOUT = 3600.0   # a tunnel (WebSocket) with no byte either way is closed (0 = never)
DEFAULT_CONNECT_TIMEOUT = 2.0          # upstream connect
DEFAULT_RESPONSE_TIMEOUT = 60.0        # upstream response head -> 504
DEFAULT_MAX_HEADER_BYTES = 64 * 1024   # -> 431
DEFAULT_HAPROXY_MAX_HEADER_BYTES = 15 * 1024   # HAProxy's own: 16 KB buffers less 1 KB to rewrite in
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024  # -> 413 (0 = unlimited)
DEFAULT_RETRIES = 2                    # other instances tried when connect fails before any byte was sent
DEFAULT_ENGINE = "embedded"            # or "haproxy"
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")  # peers whose X-Forwarded-* headers are kept
DEFAULT_HEALTH_PATH = "/_changeover/health"  # answered by the proxy for the load balancer ("" = off)
DEFAULT_PAUSE_TIMEOUT = 30.0           # `changeover pause`: resumes by itself after this
DEFAULT_PAUSE_MAX_HELD = 10000         # requests held at once while paused; beyond: 503 + Retry-After
DEFAULT_RETRY_AFTER = 30               # `changeover maintenance on`: the Retry-After its 503s carry
DEFAULT_MAX_IDLE_PER_INSTANCE = 10000  # idle keep-alive connections kept per app instance (the pool follows demand)


@dataclass(frozen=True)
class ProxySettings:
    listen: str = DEFAULT_LISTEN
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    tunnel_idle_timeout: float = DEFAULT_TUNNEL_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retries: int = DEFAULT_RETRIES
    engine: str = DEFAULT_ENGINE
    haproxy_socket: str | None = None      # attach to a running HAProxy's admin socket instead of starting one
    trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES
    # From [monitor]: how the worker groups requests into routes, so its per-route rows already use
    # the patterns the daemon judges by (a path scan cannot fill the keys before they merge).
    routes: tuple[str, ...] = ()
    max_routes: int = 32
    health_path: str = DEFAULT_HEALTH_PATH  # the host's health for a load balancer, never forwarded
    # pause and maintenance (proxy/hold.py): defaults of `changeover pause` / `maintenance on`
    pause_timeout: float = DEFAULT_PAUSE_TIMEOUT
    pause_max_held: int = DEFAULT_PAUSE_MAX_HELD
    maintenance_page: str = ""             # an HTML file (absolute once loaded); "" = a built-in page
    retry_after: int = DEFAULT_RETRY_AFTER
    max_idle_per_instance: int = DEFAULT_MAX_IDLE_PER_INSTANCE
    workers: int = 1                       # embedded proxy processes sharing the port (config: one per core)
    # A shared front (proxy/front.py): this project's host names, and whether it attaches to the
    # front listening on `listen` (its control socket: `front_socket`) instead of owning the port.
    hosts: tuple[str, ...] = ()
    shared: bool = False
    front_socket: str = ""
    tls: TlsSettings | None = None          # [proxy.tls]: the HTTPS listener (proxy/tls.py)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


class RequestRecorder(Protocol):
    """Told about every proxied request, on the hot path: implementations must be O(1) and cheap."""

    def record(self, slot: str, status: int, seconds: float, upstream_failed: bool,
               request: bytes | str | None = None) -> None:
        """status: the status sent to the client (proxy-generated 502/503/504 included);
        upstream_failed: connect refused/reset/timeout talking to the app; request: what the
        request's route is read from, starting with its request line ("GET /cart/42 HTTP/1.1",
        the whole head will do). Pass an object that already exists: the recorder only keeps a
        reference and groups requests by route later, off the per-request path."""


def probe_bind(host: str, port: int) -> int:
    """Bind (host, port) for a moment, as a listener would (SO_REUSEADDR), and return the port
    bound: whether nobody listens there before a proxy is started on it. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return int(s.getsockname()[1])
