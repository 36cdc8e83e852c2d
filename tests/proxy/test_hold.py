"""Pause and maintenance in the embedded proxy (proxy/hold.py), on real sockets and real backends.

Held requests reach no backend while paused and go to the live slot in arrival order once
resumed (or once the pause times out by itself); maintenance answers 503 with the page,
Retry-After and Cache-Control: no-store, lets requests in flight finish, records nothing against
a slot, and leaves the health check alone.
"""

from __future__ import annotations

import socket
import time

from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.hold import DEFAULT_PAGE
from tests.proxy.conftest import Backend, Client, LoopThread, make_proxy, raw, read_response, until


def open_client(port: int) -> Client:
    return Client(socket.create_connection(("127.0.0.1", port), timeout=10))


def test_pause_holds_requests_and_resume_releases_them_in_order(
        lt: LoopThread, proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    blue, green = backends
    assert proxy.gate is None                      # normal traffic: one attribute check, nothing more
    lt.call(proxy.traffic.pause, 30.0, 100)
    assert proxy.gate is proxy.traffic
    clients = []
    for i in range(8):
        c = open_client(proxy.port)
        if i == 3:   # one with a body: it waits in the socket and is forwarded whole
            c.sendall(b"POST /count?n=3 HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
        else:
            c.sendall(f"GET /r?n={i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        until(lambda i=i: len(proxy.traffic.held) == i + 1)  # type: ignore[misc]
        clients.append(c)
    assert blue.seen == [] and green.seen == []    # held: nothing forwarded, nothing answered
    lt.call(proxy.switch, "green")                 # a switch during the pause: held requests go there
    assert lt.call(proxy.traffic.resume) == 8
    assert proxy.gate is None
    for i, c in enumerate(clients):
        status, _, body = read_response(c)
        assert status == 200
        assert body == (b"5000" if i == 3 else b"green")
        c.sock.close()
    assert [s.path for s in green.seen] == ["/r"] * 3 + ["/count"] + ["/r"] * 4
    assert blue.seen == []
    # the next request on a fresh connection is not held
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 200


def test_held_requests_are_sent_in_arrival_order(lt: LoopThread, proxy: EmbeddedProxy,
                                                 backends: tuple[Backend, Backend]) -> None:
    blue, _ = backends
    lt.call(proxy.traffic.pause, 30.0, 100)
    clients = []
    for i in range(20):
        c = open_client(proxy.port)
        c.sendall(f"GET /n{i:02d} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        until(lambda i=i: len(proxy.traffic.held) == i + 1)  # type: ignore[misc]
        clients.append(c)
    lt.call(proxy.traffic.resume)
    for c in clients:
        assert read_response(c)[0] == 200
        c.sock.close()
    assert [s.path for s in blue.seen] == [f"/n{i:02d}" for i in range(20)]


def test_pause_timeout_resumes_by_itself(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    mode = lt.call(proxy.traffic.pause, 0.3, 100)
    assert mode["paused"] and mode["until"] > time.time()
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(s)      # answered once the pause ran out, with no resume()
        assert (status, body) == (200, b"blue")
    assert not proxy.traffic.paused and proxy.gate is None
    assert proxy.traffic.released == 1


def test_a_full_hold_answers_503_with_retry_after(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    lt.call(proxy.traffic.pause, 30.0, 2)
    held = [open_client(proxy.port) for _ in range(2)]
    for i, c in enumerate(held):
        c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        until(lambda i=i: len(proxy.traffic.held) == i + 1)  # type: ignore[misc]
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(s)
        assert status == 503 and 1 <= int(headers["retry-after"]) <= 30
        assert headers["cache-control"] == "no-store"
    assert proxy.traffic.refused == 1
    lt.call(proxy.traffic.resume)
    for c in held:
        assert read_response(c)[0] == 200
        c.sock.close()


def test_maintenance_answers_503_with_the_page_and_in_flight_requests_finish(
        lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    proxy = make_proxy(lt, backends, health_path="/_changeover/health")
    try:
        recorder = proxy.recorder
        slow = open_client(proxy.port)
        slow.sendall(b"GET /slow?ms=400 HTTP/1.1\r\nHost: t\r\n\r\n")
        until(lambda: proxy.slots["blue"].inflight == 1)
        page = b"<h1>back soon</h1>\n"
        lt.call(proxy.traffic.set_maintenance, True, page, 120)
        before = len(recorder.calls)  # type: ignore[union-attr]
        with raw(proxy.port) as s:
            for _ in range(2):          # keep-alive: the connection stays usable
                s.sendall(b"GET /anything HTTP/1.1\r\nHost: t\r\n\r\n")
                status, headers, body = read_response(s)
                assert status == 503 and body == page
                assert headers["retry-after"] == "120" and headers["cache-control"] == "no-store"
                assert headers["content-type"].startswith("text/html")
            s.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = read_response(s, head_only=True)
            assert status == 503 and int(headers["content-length"]) == len(page)
            s.sendall(b"GET /_changeover/health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[0] == 200     # the load balancer's check is the proxy's own
        # a request with a body is answered without reading it: that connection then ends
        with raw(proxy.port) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            status, headers, _ = read_response(s)
            assert status == 503 and headers.get("connection") == "close"
        status, _, body = read_response(slow)      # in flight when maintenance began: it finishes
        assert (status, body) == (200, b"blue")
        slow.sock.close()
        # the page is the proxy's answer, not the app's: nothing for the monitor to judge
        assert all(c[1] != 503 for c in recorder.calls[before:])  # type: ignore[union-attr]
        lt.call(proxy.traffic.set_maintenance, True, None, 5)
        with raw(proxy.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[2] == DEFAULT_PAGE
        lt.call(proxy.traffic.set_maintenance, False)
        assert proxy.gate is None
        with raw(proxy.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(s)[:3:2] == (200, b"blue")
    finally:
        lt.run(proxy.close())


def test_requests_released_into_maintenance_get_the_page(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    lt.call(proxy.traffic.pause, 30.0, 10)
    c = open_client(proxy.port)
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    until(lambda: len(proxy.traffic.held) == 1)
    lt.call(proxy.traffic.set_maintenance, True, b"page", 7)
    lt.call(proxy.traffic.resume)
    status, headers, body = read_response(c)
    assert (status, body, headers["retry-after"]) == (503, b"page", "7")
    c.sock.close()


def test_a_retiring_proxy_releases_what_it_holds_before_its_timeout(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    lt.call(proxy.traffic.pause, 30.0, 10)
    c = open_client(proxy.port)
    c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    until(lambda: len(proxy.traffic.held) == 1)
    lt.call(proxy.traffic.retiring, 0.5)          # the handover's retire timeout
    status, _, _ = read_response(c)               # released by the retire margin, not the 30 s pause
    assert status == 200
    c.sock.close()
