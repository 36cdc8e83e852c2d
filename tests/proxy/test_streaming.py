"""Streaming bodies with flow control, 100-continue, upstream errors, retries and timeouts."""

from __future__ import annotations

import socket
import struct
import time

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, LoopThread, make_proxy, raw, read_head, read_response


def _wait(cond: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_chunked_upload_streams(proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    blue = backends[0]
    piece = b"u" * 65536
    with raw(proxy.port) as s:
        s.sendall(b"POST /count HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        _wait(lambda: blue.received >= len(piece))      # the app has it before the upload ends
        for _ in range(159):
            s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        assert read_response(s)[2] == str(160 * len(piece)).encode()


def test_large_response_flow_control(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    n = 64 * 1024 * 1024
    with raw(proxy.port, timeout=20) as s:
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big?n=%d&mode=chunked HTTP/1.1\r\nHost: t\r\n\r\n" % n)
        read_head(s)
        time.sleep(0.5)                                  # client not reading: proxy must pause upstream

        async def buffered() -> int:
            return max((c.transport.get_write_buffer_size() for c in proxy.clients), default=0)
        assert lt.run(buffered()) < 4 * 1024 * 1024
        got = len(s.pre)
        s.pre = b""
        while True:
            chunk = s.sock.recv(1 << 20)
            got += len(chunk)
            if chunk.endswith(b"0\r\n\r\n") or not chunk:
                break
        assert got > n
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")   # and the connection is still usable
        assert read_response(s)[2] == b"blue"


def test_large_content_length_response(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET /big?n=5000000 HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 200 and len(body) == 5000000


def test_expect_100_continue(proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        status, _ = read_head(s)
        assert status == 100
        s.sendall(b"body")
        assert read_response(s)[2] == b"body"


def test_retry_on_connect_failure(lt: LoopThread, proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", dead_port), backends[0].addr])
    for _ in range(6):
        with raw(proxy.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 200
    calls = proxy.recorder.calls  # type: ignore[union-attr]
    assert all(c[1] == 200 and not c[3] for c in calls[-6:])


def test_retry_on_stale_pooled_connection(lt: LoopThread, proxy: EmbeddedProxy,
                                          backends: tuple[Backend, Backend]) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 200

    async def stale() -> list[object]:       # the app closes; the proxy does not notice in time
        idle = list(proxy.slots["blue"].upstreams[0].idle)
        for conn in idle:
            conn.transport.pause_reading()
        for t in backends[0].transports:
            t.close()
        return idle                           # type: ignore[return-value]
    idle = lt.run(stale())
    assert idle
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.1)

        async def wake() -> None:
            for conn in idle:
                conn.transport.resume_reading()  # type: ignore[attr-defined]
        lt.run(wake())
        assert read_response(s)[2] == b"blue"


def test_502_503_504(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    p = make_proxy(lt, backends, response_timeout=0.3, retries=1)
    try:
        with socket.socket() as dead:
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
        lt.call(p.set_slot, "blue", [("127.0.0.1", dead_port)])
        with raw(p.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 502
            lt.call(p.set_slot, "blue", [])
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 503
            lt.call(p.switch, "green")
            s.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
            t0 = time.monotonic()
            assert read_response(s)[0] == 504
            assert time.monotonic() - t0 < 2
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[2] == b"green"
        calls = p.recorder.calls  # type: ignore[union-attr]
        assert [(c[1], c[3]) for c in calls] == [(502, True), (503, False), (504, True), (200, False)]
    finally:
        lt.run(p.close())


def test_timeouts(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    p = make_proxy(lt, backends, header_timeout=0.3, idle_timeout=0.3, body_timeout=0.3)
    try:
        with raw(p.port) as s:                # slowloris: a head that never ends
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
            time.sleep(0.15)
            s.sendall(b"X-A: 1\r\n")
            assert read_response(s)[0] == 408
        with raw(p.port) as s:                # a body that stops
            s.sendall(b"POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            assert read_response(s)[0] == 408
        with raw(p.port) as s:                # idle keep-alive: closed quietly
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 200
            t0 = time.monotonic()
            assert s.recv(100) == b""
            assert 0.2 < time.monotonic() - t0 < 2
        assert len(backends[0].seen) == 1
    finally:
        lt.run(p.close())


def test_client_that_stops_reading_is_let_go(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    p = make_proxy(lt, backends, response_timeout=0.3)
    try:
        with raw(p.port, timeout=10) as s:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (64 << 20))
            time.sleep(1.0)                   # never reads: the proxy pauses the app, then gives up
            assert lt.call(len, p.clients) == 0
            assert lt.call(p.inflight, "blue") == 0
    finally:
        lt.run(p.close())


def test_client_gone_mid_request_is_recorded(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET /slow?ms=2000 HTTP/1.1\r\nHost: t\r\n\r\n")
        _wait(lambda: lt.call(proxy.inflight, "blue") == 1)
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    _wait(lambda: lt.call(proxy.inflight, "blue") == 0)
    calls = proxy.recorder.calls  # type: ignore[union-attr]
    assert calls[-1][:2] == ("blue", 499) and calls[-1][3] is False
