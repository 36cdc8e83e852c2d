"""Real backends and a real proxy on port 0, served from one background uvloop thread.

`Backend` is a small HTTP/1.1 app written on asyncio + httptools that records every request it
receives, so tests can assert that a rejected request never reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlparse

import httptools
import pytest
import uvloop

from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def wrap() -> Any:
            return fn(*args)
        return self.run(wrap())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: int = 0


@dataclass
class Backend:
    name: str
    server: asyncio.Server | None = None
    seen: list[Seen] = field(default_factory=list)
    conns: int = 0
    heads: int = 0            # request heads parsed, complete or not
    received: int = 0         # body bytes received so far (streaming checks)
    transports: list[asyncio.Transport] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


class _BackendConn(asyncio.Protocol):
    """One connection to the test app. Supports keep-alive, CL and chunked bodies, upgrade."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend
        self.parser = httptools.HttpRequestParser(self)
        self.tunnel = False
        self.headers: dict[str, str] = {}
        self.url = b""
        self.body = bytearray()
        self.body_len = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)
        self.b.conns += 1
        self.b.transports.append(self.t)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.t.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.tunnel = True
            rest = data[e.args[0]:] if e.args else b""
            if rest:
                self.t.write(rest)
        except httptools.HttpParserError:
            self.t.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.t.close()

    def on_message_begin(self) -> None:
        self.headers = {}
        self.url = b""
        self.body = bytearray()
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.b.heads += 1
        if self.headers.get("expect", "").lower() == "100-continue":
            self.t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        u = urlparse(self.url.decode())
        if u.path == "/ws":
            self.b.seen.append(Seen("GET", "/ws", self.headers))
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        self.b.received += len(body)
        if len(self.body) < 1 << 20:
            self.body += body

    def on_message_complete(self) -> None:
        u = urlparse(self.url.decode())
        if u.path == "/ws":
            return
        method = self.parser.get_method().decode()
        self.b.seen.append(Seen(method, u.path, self.headers, self.body_len))
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        head_only = method == "HEAD"
        if u.path == "/slow":
            task = asyncio.get_running_loop().create_task(self._slow(float(q.get("ms", "100")), head_only))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif u.path == "/echo":
            self._reply(200, bytes(self.body), head_only)
        elif u.path == "/count":
            self._reply(200, str(self.body_len).encode(), head_only)
        elif u.path == "/big":
            self._big(int(q.get("n", "1000000")), q.get("mode", "cl"))
        elif u.path == "/close":
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + self.b.name.encode())
            self.t.close()
        elif u.path == "/hang":
            pass
        elif u.path == "/headers":
            self._reply(200, repr(sorted(self.headers.items())).encode(), head_only)
        elif u.path == "/status":
            self._reply(int(q.get("code", "200")), b"", head_only)
        else:
            self._reply(200, self.b.name.encode(), head_only)

    async def _slow(self, ms: float, head_only: bool) -> None:
        await asyncio.sleep(ms / 1000)
        if not self.t.is_closing():
            self._reply(200, self.b.name.encode(), head_only)

    def _reply(self, status: int, body: bytes, head_only: bool = False) -> None:
        extra = b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nConnection: x-hop\r\n"
        head = b"HTTP/1.1 %d X\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n" % (
            status, len(body), extra)
        self.t.write(head if head_only or status in (204, 304) else head + body)

    def _big(self, n: int, mode: str) -> None:
        piece = b"x" * 65536
        if mode == "chunked":
            self.t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            left = n
            while left:
                k = min(left, len(piece))
                self.t.write(b"%x\r\n" % k + piece[:k] + b"\r\n")
                left -= k
            self.t.write(b"0\r\n\r\n")
        else:
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % n)
            left = n
            while left:
                k = min(left, len(piece))
                self.t.write(piece[:k])
                left -= k

    def connection_lost(self, exc: Exception | None) -> None:
        for t in self.tasks:
            t.cancel()


async def start_backend(name: str) -> Backend:
    b = Backend(name)
    b.server = await asyncio.get_running_loop().create_server(lambda: _BackendConn(b), "127.0.0.1", 0)
    return b


@pytest.fixture(scope="session")
def lt() -> Iterator[LoopThread]:
    t = LoopThread()
    yield t
    t.stop()


@pytest.fixture
def backends(lt: LoopThread) -> Iterator[tuple[Backend, Backend]]:
    blue = lt.run(start_backend("blue"))
    green = lt.run(start_backend("green"))
    yield blue, green
    for b in (blue, green):
        assert b.server is not None
        b.server.close()


def make_proxy(lt: LoopThread, backends: tuple[Backend, Backend], **kw: Any) -> EmbeddedProxy:
    settings = ProxySettings(listen="127.0.0.1:0", **kw)
    proxy = EmbeddedProxy(settings, Recorder())
    lt.run(proxy.start())
    blue, green = backends
    lt.call(proxy.set_slot, "blue", [blue.addr])
    lt.call(proxy.set_slot, "green", [green.addr])
    lt.call(proxy.switch, "blue")
    return proxy


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float, bool]] = []

    def record(self, slot: str, status: int, seconds: float, upstream_failed: bool,
               request: bytes | str | None = None) -> None:
        self.calls.append((slot, status, seconds, upstream_failed))


@pytest.fixture
def proxy(lt: LoopThread, backends: tuple[Backend, Backend]) -> Iterator[EmbeddedProxy]:
    p = make_proxy(lt, backends)
    yield p
    lt.run(p.close())


class Client:
    """A blocking socket with a push-back buffer, so pipelined responses are read one by one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pre = b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        if self.pre:
            d, self.pre = self.pre, b""
            return d
        return self.sock.recv(n)

    def unread(self, data: bytes) -> None:
        self.pre = data + self.pre

    def settimeout(self, t: float) -> None:
        self.sock.settimeout(t)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)


def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (polling) until `cond()` holds: what the proxy's loop thread does after a socket
    event the test caused is not ordered with the test's next call into that loop."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@contextlib.contextmanager
def raw(port: int, timeout: float = 5) -> Iterator[Client]:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        yield Client(s)
    finally:
        s.close()


def read_head(s: Client) -> tuple[int, dict[str, str]]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    s.unread(rest)
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers


def read_exact(s: Client, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed mid-body")
        out += chunk
    if len(out) > n:
        s.unread(out[n:])
    return out[:n]


def read_line(s: Client) -> bytes:
    buf = b""
    while b"\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-chunk")
        buf += chunk
    line, _, rest = buf.partition(b"\r\n")
    s.unread(rest)
    return line


def read_response(s: Client, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Read one final response (Content-Length, chunked or close-delimited), skipping 1xx."""
    status, headers = read_head(s)
    while 100 <= status < 200 and status != 101:
        status, headers = read_head(s)
    if head_only or status in (101, 204, 304):
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, read_exact(s, int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(read_line(s).split(b";")[0], 16)
            if size == 0:
                while read_line(s):
                    pass
                return status, headers, body
            body += read_exact(s, size)
            assert read_exact(s, 2) == b"\r\n"
    body = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return status, headers, body
        body += chunk


def get(port: int, path: str = "/", headers: str = "") -> tuple[int, dict[str, str], bytes]:
    with raw(port) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode())
        return read_response(s)


class _Scripted(asyncio.Protocol):
    """Answers every request head with the same raw bytes, then optionally closes."""

    def __init__(self, reply: bytes, close: bool) -> None:
        self.reply = reply
        self.close = close
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.buf = b""
            self.t.write(self.reply)
            if self.close:
                self.t.close()


async def scripted_backend(reply: bytes, close: bool = False) -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(lambda: _Scripted(reply, close), "127.0.0.1", 0)
