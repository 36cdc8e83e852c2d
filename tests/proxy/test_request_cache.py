"""A request head seen before is not parsed again (client._SEEN), and only where its outcome
depends on its bytes alone: each connection still gets its own forwarding headers, a refused head
is refused every time, an absolute-form head reaches the app in origin-form every time, and a head
with a body or forwarding headers is never kept."""

from __future__ import annotations

import socket

from changeover.proxy import client
from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, Client, raw, read_response


def _from(source: str, port: int, head: bytes, n: int = 3) -> list[int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    with s:
        c = Client(s)
        statuses = []
        for _ in range(n):
            c.sendall(head)
            statuses.append(read_response(c)[0])
        return statuses


def test_the_same_head_from_two_addresses_gets_each_its_own_forwarding_headers(
        proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    client._SEEN.clear()
    head = b"GET /same HTTP/1.1\r\nHost: app.local\r\n\r\n"
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
        assert _from(source, proxy.port, head) == [200, 200, 200]
        for seen in backends[0].seen[-3:]:
            assert seen.path == "/same"
            assert (seen.headers["x-forwarded-for"], seen.headers["x-forwarded-host"],
                    seen.headers["host"]) == (source, "app.local", "app.local")
    assert head[:-4] in client._SEEN, "the plain head was kept"


def test_absolute_form_is_rewritten_every_time(proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    client._SEEN.clear()
    head = b"GET http://shop.example:8080/cart?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n"
    assert _from("127.0.0.1", proxy.port, head) == [200, 200, 200]
    for seen in backends[0].seen[-3:]:
        assert seen.path == "/cart" and seen.headers["host"] == "shop.example:8080"


def test_refused_heads_are_refused_again_and_never_kept(proxy: EmbeddedProxy) -> None:
    client._SEEN.clear()
    for head in (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",      # two Hosts
                 b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n",                # two spaces
                 b"GET / HTTP/1.1\r\n\r\n"):                           # HTTP/1.1 without Host
        for _ in range(2):
            with raw(proxy.port) as s:
                s.sendall(head)
                assert read_response(s)[0] == 400, head
    assert not client._SEEN


def test_heads_with_a_body_or_forwarding_headers_are_not_kept(proxy: EmbeddedProxy,
                                                              backends: tuple[Backend, Backend]) -> None:
    client._SEEN.clear()
    with raw(proxy.port) as s:
        for _ in range(2):
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
            status, _, body = read_response(s)
            assert (status, body) == (200, b"abc")
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
            assert read_response(s)[0] == 200
            # the default trusted_proxies hold 127.0.0.0/8: the chain is extended, by the full rewrite
            assert backends[0].seen[-1].headers["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert not client._SEEN


def test_the_kept_heads_are_bounded(proxy: EmbeddedProxy) -> None:
    client._SEEN.clear()
    with raw(proxy.port) as s:
        for n in range(client._SEEN_MAX + 20):                # a different path each time
            s.sendall(f"GET /p{n} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert read_response(s)[0] == 200
    assert 0 < len(client._SEEN) <= client._SEEN_MAX
