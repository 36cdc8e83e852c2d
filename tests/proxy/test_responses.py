"""Odd and broken upstream responses, as raw bytes from a scripted app."""

from __future__ import annotations

import pytest

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import LoopThread, raw, read_head, read_response, scripted_backend

CASES = [
    ("both CL and TE", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 502),
    ("conflicting CLs", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 502),
    ("garbage status line", b"HTTP/1.1 2x0 OK\r\n\r\n", 502),
    ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n", 502),
    ("101 without upgrade", b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n", 502),
    ("bad CL", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", 502),
]


@pytest.mark.parametrize(("name", "reply", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_upstream_response(lt: LoopThread, proxy: EmbeddedProxy, name: str, reply: bytes, status: int) -> None:
    server = lt.run(scripted_backend(reply))
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == status, name
    server.close()


def test_early_hints_and_http10_upstream(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    reply = (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
             b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold server")
    server = lt.run(scripted_backend(reply, close=True))
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers = read_head(s)
        assert status == 103 and headers["link"] == "</a.css>"
        status, headers, body = read_response(s)
        assert (status, body) == (200, b"old server")
        assert headers["connection"] == "close"         # close-delimited: the client must see the end
    server.close()


def test_upstream_dies_mid_body(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    server = lt.run(scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", close=True))
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _ = read_head(s)
        assert status == 200
        got = s.recv(1000)
        while True:
            more = s.recv(1000)
            if not more:
                break
            got += more
        assert got == b"only part"                       # truncated response: the client is cut
    calls = proxy.recorder.calls  # type: ignore[union-attr]
    assert calls[-1][1:2] == (200,) and calls[-1][3] is True
    server.close()


def test_http10_client_keepalive(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = read_response(s)
            assert (status, body) == (200, b"blue") and headers["connection"] == "keep-alive"


def test_early_response_before_body_closes(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    server = lt.run(scripted_backend(b"HTTP/1.1 413 Too Big\r\nContent-Length: 0\r\n\r\n"))
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    with raw(proxy.port) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nstart")
        status, headers, _ = read_response(s)
        assert status == 413 and headers["connection"] == "close"
    server.close()


def test_client_connection_close_is_honoured(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, body = read_response(s)
        assert (status, body, headers["connection"]) == (200, b"blue", "close")
        assert s.recv(10) == b""


def test_last_transfer_coding_decides(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\n\r\n")
    server = lt.run(scripted_backend(reply))
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    with raw(proxy.port) as s:
        for _ in range(2):                              # framed correctly: the connection stays usable
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = read_response(s)
            assert (status, body) == (200, b"abc") and "connection" not in headers
    server.close()


def test_no_body_statuses(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        for code in (204, 304):
            s.sendall(b"GET /status?code=%d HTTP/1.1\r\nHost: t\r\n\r\n" % code)
            status, _, body = read_response(s)
            assert (status, body) == (code, b"")
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[2] == b"blue"
