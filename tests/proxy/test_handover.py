"""Proxy replacement without a gap: a successor binds the same port (SO_REUSEPORT) and the old
proxy `retire()`s: it stops accepting and every client connection ends cleanly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import RETIRE_IDLE_GRACE, RETIRE_LISTEN_SETTLE, EmbeddedProxy, ListenError

from .conftest import Backend, LoopThread, Recorder, raw, read_exact, read_head, read_response, until

WS = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


class Proxies:
    """Proxies on the test loop, all routing to the blue backend; closed at the end."""

    def __init__(self, lt: LoopThread, backend: Backend) -> None:
        self.lt = lt
        self.backend = backend
        self.started: list[EmbeddedProxy] = []

    def start(self, port: int = 0, reuse_port: bool = True) -> tuple[EmbeddedProxy, Recorder]:
        rec = Recorder()
        p = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{port}"), rec, reuse_port=reuse_port)
        # routes first: a successor takes connections as soon as it listens
        self.lt.call(p.set_slot, "blue", [self.backend.addr])
        self.lt.call(p.switch, "blue")
        self.lt.run(p.start())
        self.started.append(p)
        return p, rec

    def retire(self, p: EmbeddedProxy, timeout: float) -> concurrent.futures.Future[int]:
        return asyncio.run_coroutine_threadsafe(p.retire(timeout), self.lt.loop)

    def clients(self, p: EmbeddedProxy) -> int:
        return int(self.lt.call(len, p.clients))


@pytest.fixture
def proxies(lt: LoopThread, backends: tuple[Backend, Backend]) -> Iterator[Proxies]:
    ps = Proxies(lt, backends[0])
    yield ps
    for p in ps.started:
        lt.run(p.close())


# -- the hand-over under load -------------------------------------------------------------------
class Load:
    """Keep-alive clients sending GET back to back; on `Connection: close` they reconnect."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = False
        self.ok = 0
        self.closes = 0
        self.connects = 0
        self.failures: list[str] = []

    async def client(self) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self.stop:
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                    self.connects += 1
                reader, writer = conn
                writer.write(GET)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                low = head.lower()
                length = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await asyncio.wait_for(reader.readexactly(length), 5)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, IndexError, ValueError) as e:
                self.failures.append(repr(e))
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            if not head.startswith(b"HTTP/1.1 200") or body != b"blue":
                self.failures.append(head.decode("latin-1"))
            self.ok += 1
            if b"\r\nconnection: close\r\n" in low:
                self.closes += 1
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()


def test_retire_hands_the_port_over_without_a_failed_request(lt: LoopThread, proxies: Proxies) -> None:
    old, old_rec = proxies.start()
    port = old.port

    async def run() -> dict[str, int]:
        load = Load(port)
        tasks = [asyncio.create_task(load.client()) for _ in range(24)]
        await asyncio.sleep(0.3)                     # every client is on the old proxy
        new, new_rec = await asyncio.to_thread(proxies.start, port)
        assert new.port == port
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(proxies.clients, old) == 24
        before = load.ok
        t0 = time.monotonic()
        cut = await asyncio.wrap_future(proxies.retire(old, 5))
        took = time.monotonic() - t0
        assert load.ok > before                      # traffic kept flowing during retire
        old_served = len(old_rec.calls)
        assert await asyncio.to_thread(proxies.clients, old) == 0
        new_before = len(new_rec.calls)
        await asyncio.sleep(0.5)
        new_clients = await asyncio.to_thread(proxies.clients, new)
        load.stop = True
        await asyncio.gather(*tasks)
        assert load.failures == []
        assert len(old_rec.calls) == old_served      # nothing reached the old proxy after retire
        assert len(new_rec.calls) > new_before + 100
        assert load.ok == len(old_rec.calls) + len(new_rec.calls)
        assert all(status == 200 for _, status, _, _ in old_rec.calls + new_rec.calls)
        return {"cut": cut, "closes": load.closes, "connects": load.connects, "took_ms": int(took * 1000),
                "new_clients": new_clients}

    r = asyncio.run(run())
    assert r["cut"] == 0
    assert r["closes"] >= 24                         # every old connection was told to go
    assert r["connects"] >= 48
    assert r["new_clients"] == 24
    assert r["took_ms"] < RETIRE_IDLE_GRACE * 1000   # busy clients never wait for the grace


def test_connections_in_the_accept_queue_are_not_lost(lt: LoopThread, proxies: Proxies) -> None:
    """Short-lived connections keep arriving while the old listener closes: the ones the kernel
    already queued on it are taken over by the retiring proxy, not reset."""
    old, _ = proxies.start()
    port = old.port
    proxies.start(port)

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    async def run() -> list[BaseException]:
        stop = False
        errors: list[BaseException] = []

        async def churn() -> None:
            while not stop:
                try:
                    await one()
                except (OSError, AssertionError, TimeoutError) as e:
                    errors.append(e)

        tasks = [asyncio.create_task(churn()) for _ in range(8)]
        await asyncio.sleep(0.3)
        assert await asyncio.wrap_future(proxies.retire(old, 5)) == 0
        await asyncio.sleep(0.2)
        stop = True
        await asyncio.gather(*tasks)
        return errors

    assert asyncio.run(run()) == []


def test_the_next_successor_shares_the_port_again(lt: LoopThread, proxies: Proxies) -> None:
    """The retired proxy's steering does not outlive the hand-over: the next proxy that binds the
    address shares new connections with the current one, as SO_REUSEPORT does."""
    a, _ = proxies.start()
    b, _ = proxies.start(a.port)
    assert proxies.retire(a, 5).result(5) == 0
    c, _ = proxies.start(a.port)
    socks = [socket.create_connection(("127.0.0.1", a.port), timeout=5) for _ in range(40)]
    try:
        for s in socks:
            s.sendall(GET)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert proxies.clients(b) > 0 and proxies.clients(c) > 0
        assert proxies.clients(b) + proxies.clients(c) == 40
    finally:
        for s in socks:
            s.close()


# -- how each kind of connection ends ------------------------------------------------------------
def test_idle_keepalive_gets_the_grace_then_is_closed(lt: LoopThread, proxies: Proxies) -> None:
    p, _ = proxies.start()
    with raw(p.port) as idle, raw(p.port) as late:
        for s in (idle, late):
            s.sendall(GET)
            assert read_response(s)[2] == b"blue"
        t0 = time.monotonic()
        fut = proxies.retire(p, 5)
        time.sleep(0.3)
        late.sendall(GET)                            # within the grace: answered, then closed
        status, headers, body = read_response(late)
        assert (status, body, headers["connection"]) == (200, b"blue", "close")
        assert late.recv(100) == b""
        idle.settimeout(RETIRE_IDLE_GRACE + 1)
        assert idle.recv(100) == b""                 # closed cleanly, nothing half-written
        closed_after = time.monotonic() - t0
        assert fut.result(5) == 0
    assert 0.8 * RETIRE_IDLE_GRACE < closed_after < RETIRE_IDLE_GRACE + 0.5
    assert proxies.clients(p) == 0


def test_slow_request_in_flight_completes(lt: LoopThread, proxies: Proxies) -> None:
    p, _ = proxies.start()
    with raw(p.port) as s:
        s.sendall(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        t0 = time.monotonic()
        fut = proxies.retire(p, 5)
        status, headers, body = read_response(s)
        assert (status, body, headers["connection"]) == (200, b"blue", "close")
        assert s.recv(100) == b""
        assert fut.result(5) == 0
        assert 1.0 < time.monotonic() - t0 < 2.5


def test_slow_request_past_the_timeout_gets_504(lt: LoopThread, proxies: Proxies) -> None:
    p, _ = proxies.start()
    with raw(p.port) as s:
        s.sendall(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.1)
        assert proxies.retire(p, 0.3).result(5) == 1
        status, headers, _ = read_response(s)
        assert (status, headers["connection"]) == (504, "close")
        assert s.recv(100) == b""


def test_request_sent_while_a_response_is_written_is_answered_then_closed(
        lt: LoopThread, proxies: Proxies) -> None:
    p, _ = proxies.start()
    n = 32 << 20
    with raw(p.port) as s:
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
        status, headers = read_head(s)               # head sent before retire: keep-alive
        assert status == 200 and "connection" not in headers
        fut = proxies.retire(p, 5)
        time.sleep(0.1)
        s.sendall(GET)                               # pipelined behind the body still being sent
        left = n
        while left:
            left -= len(read_exact(s, min(left, 1 << 20)))
        status, headers, body = read_response(s)
        assert (status, body, headers["connection"]) == (200, b"blue", "close")
        assert s.recv(100) == b""
        assert fut.result(5) == 0


def test_websocket_survives_retire_until_it_closes(lt: LoopThread, proxies: Proxies) -> None:
    p, _ = proxies.start()
    with raw(p.port) as ws:
        ws.sendall(WS)
        assert read_head(ws)[0] == 101
        fut = proxies.retire(p, 10)
        time.sleep(RETIRE_IDLE_GRACE + 0.3)          # past the idle grace: tunnels are not idle
        ws.sendall(b"still here")
        assert ws.recv(100) == b"still here"
        assert not fut.done()
        t0 = time.monotonic()
    assert fut.result(5) == 0                        # the client closed it: retire ends
    assert time.monotonic() - t0 < 0.5


def test_websocket_is_cut_at_the_timeout(lt: LoopThread, proxies: Proxies) -> None:
    p, _ = proxies.start()
    with raw(p.port) as ws:
        ws.sendall(WS)
        assert read_head(ws)[0] == 101
        t0 = time.monotonic()
        assert proxies.retire(p, 0.3).result(5) == 1
        assert 0.25 < time.monotonic() - t0 < 1
        assert ws.recv(100) == b"\x88\x02\x03\xe9"   # a WebSocket close frame, 1001 (going away)
        assert ws.recv(100) == b""
    until(lambda: lt.call(p.inflight, "blue") == 0)   # the proxy sees the client's close after we do


# -- lifecycle -----------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse_port", [True, False])
def test_retire_without_connections_returns_at_once_and_frees_the_port(lt: LoopThread, proxies: Proxies,
                                                                       reuse_port: bool) -> None:
    p, _ = proxies.start(reuse_port=reuse_port)
    port = p.port
    t0 = time.monotonic()
    assert proxies.retire(p, 5).result(5) == 0
    # with SO_REUSEPORT the listener lets handshakes under way complete before it closes
    assert time.monotonic() - t0 < (RETIRE_LISTEN_SETTLE if reuse_port else 0) + 0.15
    assert p.port == port                            # still known (the worker reports it)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # the listener is gone: the port binds again even without SO_REUSEPORT
    again, _ = proxies.start(port, reuse_port=False)
    with raw(again.port) as s:
        s.sendall(GET)
        assert read_response(s)[2] == b"blue"
    assert proxies.retire(p, 5).result(5) == 0      # twice: nothing left to do
    lt.run(p.close())


def test_slots_keep_working_while_retiring(lt: LoopThread, proxies: Proxies,
                                           backends: tuple[Backend, Backend]) -> None:
    p, _ = proxies.start()
    with raw(p.port) as s:
        s.sendall(GET)
        assert read_response(s)[2] == b"blue"
        fut = proxies.retire(p, 5)
        time.sleep(0.1)
        lt.call(p.set_slot, "green", [backends[1].addr])
        lt.call(p.switch, "green")
        s.sendall(GET)
        status, headers, body = read_response(s)
        assert (status, body, headers["connection"]) == (200, b"green", "close")
        assert fut.result(5) == 0


@pytest.mark.parametrize("first", [False, True])
def test_without_reuse_port_a_second_bind_is_refused(lt: LoopThread, proxies: Proxies, first: bool) -> None:
    p, _ = proxies.start(reuse_port=first)
    second = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{p.port}"), reuse_port=False)
    with pytest.raises(ListenError) as e:
        lt.run(second.start())
    assert f"127.0.0.1:{p.port}" in str(e.value)
    if not first:                                     # SO_REUSEPORT only works if both ask for it
        third = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{p.port}"), reuse_port=True)
        with pytest.raises(ListenError):
            lt.run(third.start())
    with contextlib.suppress(Exception):
        lt.run(second.close())
