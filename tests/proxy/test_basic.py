"""Basic proxying: routing, keep-alive, headers, HEAD, bodies, switching."""

from __future__ import annotations

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, LoopThread, get, raw, read_response


def test_get_and_headers(proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    status, headers, body = get(proxy.port, "/", "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
                                "Keep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: x\r\n"
                                "X-Forwarded-For: 10.0.0.1\r\nX_Forwarded_For: 6.6.6.6\r\n"
                                "X-Forwarded-Proto: https\r\n")
    assert (status, body) == (200, b"blue")
    assert headers["via"] == "1.1 changeover"
    assert "keep-alive" not in headers and "x-hop" not in headers
    seen = backends[0].seen[-1].headers
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"      # loopback is a trusted proxy by default
    assert seen["x-forwarded-host"] == "test"
    assert seen["via"] == "1.1 changeover"
    for hop in ("x-secret", "keep-alive", "te", "proxy-authorization", "connection", "x_forwarded_for"):
        assert hop not in seen


def test_keepalive_moves_on_switch(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        for expect in ("blue", "green", "blue"):
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[2] == expect.encode()
            lt.call(proxy.switch, "green" if expect == "blue" else "blue")


def test_head_and_post(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, rest = read_response(s, head_only=True)
        assert status == 200 and headers["content-length"] == "4" and rest == b""
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        assert read_response(s)[2] == b"hello"
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
        assert read_response(s)[2] == b"abcde"


def test_pipelined(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET /slow?ms=50 HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok")
        assert read_response(s)[2] == b"blue"
        assert read_response(s)[2] == b"blue"
        assert read_response(s)[2] == b"ok"


def test_http10_and_close_delimited(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 200 and body == b"blue" and headers.get("connection") == "close"
        assert s.recv(10) == b""
    with raw(proxy.port) as s:
        s.sendall(b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(s)
        assert body == b"blue" and headers["connection"] == "close"


def test_no_live_slot_503(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    lt.call(proxy.switch, None)
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 503
        lt.call(proxy.switch, "green")
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[2] == b"green"


def test_pipelined_burst_without_slot(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    lt.call(proxy.switch, None)
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 2000)
        for _ in range(2000):
            assert read_response(s)[0] == 503


def test_listen_errors(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    import pytest

    from changeover.errors import ChangeoverError
    from changeover.proxy.base import ProxySettings

    taken = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{proxy.port}"))
    with pytest.raises(ChangeoverError, match=r"cannot listen on 127\.0\.0\.1:.*in use") as info:
        lt.run(taken.start())
    assert isinstance(info.value, OSError)
    with pytest.raises(ChangeoverError, match="expected host:port"):
        lt.run(EmbeddedProxy(ProxySettings(listen="nonsense")).start())
    with pytest.raises(ChangeoverError, match="unknown slot"):
        lt.call(proxy.switch, "purple")
    with pytest.raises(ChangeoverError, match=r"not \(host, port"):
        lt.call(proxy.set_slot, "blue", [("127.0.0.1", 70000)])
    with pytest.raises(ChangeoverError, match="is live"):
        lt.call(proxy.remove_slot, "blue")
