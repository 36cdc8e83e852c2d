"""Request heads under attack: slow heads, many unfinished heads, stray empty lines, huge URIs.

Real sockets; a raw backend records the exact bytes the app receives.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import cast

import pytest

from changeover.proxy.client import MAX_PARTIAL_HEADS_PER_CLIENT
from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, Client, LoopThread, make_proxy, raw, read_response

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Recording(asyncio.Protocol):
    """An app that keeps every byte it receives and answers each request head with OK."""

    def __init__(self, got: list[bytes]) -> None:
        self.got = got
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got.append(data)
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.t.write(OK)


@pytest.fixture
def recorded(lt: LoopThread, proxy: EmbeddedProxy) -> Iterator[list[bytes]]:
    got: list[bytes] = []

    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(lambda: _Recording(got), "127.0.0.1", 0)

    server = lt.run(start())
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    yield got
    server.close()


def wait_for(what: str, cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- slow heads ---------------------------------------------------------------------------------
def test_a_dripped_head_is_scanned_once(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    """A client dripping a byte at a time into a big unfinished head costs what it sends: every
    byte is looked at a bounded number of times (before: the whole head was copied and scanned
    again for every packet, 60 KB x packets)."""
    proxy = make_proxy(lt, backends, max_header_bytes=256 * 1024)
    try:
        prefix = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 60_000
        drips = 400
        with raw(proxy.port) as s:
            s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(prefix)
            for _ in range(drips):
                s.sendall(b"b")
            s.sendall(b"\r\n\r\n")
            assert read_response(s)[0] == 200
        sent = len(prefix) + drips + 4
        scanned = lt.call(lambda: proxy.head_bytes_scanned)
        assert scanned <= sent + 4 * (drips + 1), (scanned, sent)     # linear, not sent x packets
        assert backends[0].seen[-1].headers["x-pad"] == "a" * 60_000 + "b" * drips
    finally:
        lt.run(proxy.close())


def test_unfinished_heads_per_address_are_capped(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    proxy = make_proxy(lt, backends, trusted_proxies=("127.0.0.1/32",))
    socks: list[socket.socket] = []

    def partial(source: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5, source_address=(source, 0))
        socks.append(s)
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        return s

    def unfinished(ip: bytes) -> int:
        return int(lt.call(lambda: proxy.partial_heads.get(ip, 0)))

    try:
        for _ in range(MAX_PARTIAL_HEADS_PER_CLIENT):
            partial("127.0.0.2")
        wait_for("the unfinished heads", lambda: unfinished(b"127.0.0.2") == MAX_PARTIAL_HEADS_PER_CLIENT)
        over = Client(partial("127.0.0.2"))
        status, headers, _ = read_response(over)
        assert status == 429 and headers["connection"] == "close"
        # a trusted proxy in front carries many clients: not capped
        trusted = Client(partial("127.0.0.1"))
        trusted.sendall(b"\r\n")
        assert read_response(trusted)[0] == 200
        # one finishes its head: there is room for another
        first = Client(socks[0])
        first.sendall(b"\r\n")
        assert read_response(first)[0] == 200
        wait_for("the count to go down", lambda: unfinished(b"127.0.0.2") == MAX_PARTIAL_HEADS_PER_CLIENT - 1)
        again = Client(partial("127.0.0.2"))
        again.sendall(b"\r\n")
        assert read_response(again)[0] == 200
    finally:
        for s in socks:
            s.close()
        wait_for("closed connections to be forgotten", lambda: not lt.call(lambda: dict(proxy.partial_heads)))
        lt.run(proxy.close())


# -- empty lines before the request line --------------------------------------------------------
@pytest.mark.parametrize("parts", [
    [b"\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"],
    [b"\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"],
    [b"\r\n", b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"],
    [b"\r", b"\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"],
], ids=["crlf crlf", "lf", "crlf, then the request", "cr, then lf and the request"])
def test_empty_lines_before_the_request_never_reach_the_app(proxy: EmbeddedProxy, recorded: list[bytes],
                                                            parts: list[bytes]) -> None:
    with raw(proxy.port) as s:
        s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for p in parts:
            s.sendall(p)
        assert read_response(s)[2] == b"ok"
    assert b"".join(recorded).startswith(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("request_bytes", [b"\rGET / HTTP/1.1\r\nHost: t\r\n\r\n",
                                           b"\r\n\rGET / HTTP/1.1\r\nHost: t\r\n\r\n"],
                         ids=["bare cr", "crlf then bare cr"])
def test_a_bare_cr_before_the_request_is_refused(proxy: EmbeddedProxy, recorded: list[bytes],
                                                 request_bytes: bytes) -> None:
    with raw(proxy.port) as s:
        s.sendall(request_bytes)
        assert read_response(s)[0] == 400
    assert recorded == []


def test_a_keepalive_connection_sending_only_empty_lines_gets_the_head_timeout(
        lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    proxy = make_proxy(lt, backends, header_timeout=0.3, idle_timeout=30)
    try:
        with raw(proxy.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 200
            s.sendall(b"\r\n")                 # not a request: it must not keep the connection idle
            s.settimeout(10)
            assert s.recv(100) == b""          # closed at the head timeout, well before idle_timeout
    finally:
        lt.run(proxy.close())


# -- sizes ------------------------------------------------------------------------------------
def test_a_64k_uri_gets_414(proxy: EmbeddedProxy, recorded: list[bytes]) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET /" + b"a" * 65536)
        status, headers, _ = read_response(s)
        assert status == 414 and headers["connection"] == "close"
    assert recorded == []


def test_big_headers_still_get_431(proxy: EmbeddedProxy, recorded: list[bytes]) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: " + b"a" * 70_000 + b"\r\n")
        assert read_response(s)[0] == 431
    assert recorded == []


# -- the request line's shape -------------------------------------------------------------------
# Found by the fuzz harness (tests/fuzz): llhttp reads the first two as HTTP/0.9 (`GET /w` and
# `GET /HTTP/1.1`) and lets the third through; an app could read each differently from the proxy.
BAD_LINES = [
    ("bare LF in the target", [b"GET /w\nX: y HTTP/1.1\r\nHost: t\r\n\r\n"]),
    ("bare LF, one space", [b"GET /w\nX:y HTTP/1.1\r\nHost: t\r\n\r\n"]),
    ("HTTP/0.9 shape", [b"GET /HTTP/1.1\r\nHost: t\r\n\r\n"]),
    ("HTTP/0.9 shape, then a request", [b"GET /HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n"]),
    ("HTTP/0.9 shape in two reads", [b"GET /HTTP/1.1\r\n", b"Host: t\r\n\r\n"]),
    ("two spaces before the version", [b"POST /  HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"]),
    ("two spaces after the method", [b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n"]),
]


@pytest.mark.parametrize("parts", [c[1] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_a_request_line_not_method_sp_target_sp_version_gets_400(proxy: EmbeddedProxy, recorded: list[bytes],
                                                                  parts: list[bytes]) -> None:
    with raw(proxy.port) as s:
        s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for p in parts:
            s.sendall(p)
        status, headers, _ = read_response(s)
        assert status == 400 and headers["connection"] == "close"
    assert recorded == []
    with raw(proxy.port) as s:                  # the app's connections are still in step
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[2] == b"ok"
    assert b"".join(recorded).startswith(b"GET / HTTP/1.1\r\n")
