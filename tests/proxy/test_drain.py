"""Requests and tunnels in flight on the old slot survive a switch; drain waits, then cuts."""

from __future__ import annotations

import concurrent.futures
import time

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, LoopThread, raw, read_head, read_response

WS = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"


def _slow(port: int, ms: int) -> bytes:
    with raw(port) as s:
        s.sendall(b"GET /slow?ms=%d HTTP/1.1\r\nHost: t\r\n\r\n" % ms)
        status, _, body = read_response(s)
        assert status == 200
        return body


def test_slow_requests_finish_and_drain_waits(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futs = [pool.submit(_slow, proxy.port, 400) for _ in range(5)]
        deadline = time.monotonic() + 3
        while lt.call(proxy.inflight, "blue") < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        lt.call(proxy.switch, "green")
        with raw(proxy.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[2] == b"green"
        t0 = time.monotonic()
        assert lt.run(proxy.drain("blue", 5)) is True
        assert 0.1 < time.monotonic() - t0 < 2
        assert [f.result() for f in futs] == [b"blue"] * 5
    assert lt.call(proxy.inflight, "blue") == 0


def test_websocket_survives_switch_then_drain_timeout_cuts_it(lt: LoopThread, proxy: EmbeddedProxy,
                                                              backends: tuple[Backend, Backend]) -> None:
    with raw(proxy.port) as ws:
        ws.sendall(WS + b"early")
        status, headers = read_head(ws)
        assert status == 101 and headers["upgrade"] == "websocket"
        assert backends[0].seen[-1].headers["connection"].lower() == "upgrade"
        got = ws.recv(100)
        assert got == b"early"
        assert lt.call(proxy.inflight, "blue") == 1
        lt.call(proxy.switch, "green")
        ws.sendall(b"still here")
        assert ws.recv(100) == b"still here"
        t0 = time.monotonic()
        assert lt.run(proxy.drain("blue", 0.3)) is False
        assert 0.25 < time.monotonic() - t0 < 2
        assert ws.recv(100) == b""              # the tunnel was closed at the timeout
    assert lt.call(proxy.inflight, "blue") == 0


def test_websocket_closed_by_client_ends_drain(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    ws = raw(proxy.port)
    s = ws.__enter__()
    s.sendall(WS)
    assert read_head(s)[0] == 101
    lt.call(proxy.switch, "green")

    def closer() -> None:
        time.sleep(0.2)
        ws.__exit__(None, None, None)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(closer)
        assert lt.run(proxy.drain("blue", 5)) is True


def test_drain_timeout_answers_slow_request(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    with raw(proxy.port) as s:
        s.sendall(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.1)
        lt.call(proxy.switch, "green")
        assert lt.run(proxy.drain("blue", 0.2)) is False
        assert read_response(s)[0] == 504
