"""One behaviour suite for every data plane, through the `ProxyControl` API only.

Each test runs on the embedded proxy worker and on HAProxy (skipped, with the reason, when the
`haproxy` binary is missing), with real app backends and real keep-alive clients.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from changeover.proxy.base import ProxySettings
from changeover.proxy.control import ProxyControl
from changeover.proxy.engines import make_control

from .conftest import Backend, LoopThread

ENGINES = [
    "embedded",
    pytest.param("haproxy", marks=pytest.mark.skipif(shutil.which("haproxy") is None,
                                                     reason="the haproxy binary is not installed")),
]


class Plane:
    """An engine plus what a test needs around it: its settings, state dir and the loop it runs on."""

    def __init__(self, lt: LoopThread, engine: str, backends: tuple[Backend, Backend]) -> None:
        self.lt = lt
        # short: HAProxy's unix sockets live under it (sun_path is 108 bytes)
        self.dir = Path(tempfile.mkdtemp(prefix="co-eng-"))
        self.settings = ProxySettings(listen="127.0.0.1:0", engine=engine, drain_timeout=5)
        blue, green = self.backends = backends
        self.initial = {"slots": {"blue": [list(blue.addr)], "green": [list(green.addr)]},
                        "versions": {"blue": "v1", "green": "v2"}, "live": "blue"}
        self.control = self.new()
        assert lt.run(self.control.ensure(self.initial)) == "started"

    def new(self) -> ProxyControl:
        return make_control(self.settings, self.dir)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return self.lt.run(coro, timeout)

    @property
    def port(self) -> int:
        assert self.control.port is not None
        return self.control.port

    def close(self) -> None:
        self.run(self.control.shutdown())
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=ENGINES)
def plane(request: pytest.FixtureRequest, lt: LoopThread, backends: tuple[Backend, Backend]) -> Iterator[Plane]:
    p = Plane(lt, request.param, backends)
    yield p
    p.close()


async def keepalive_client(port: int, stop: asyncio.Event, log: list[tuple[float, float, bytes]],
                           failures: list[str]) -> None:
    """A keep-alive HTTP/1.1 client as browsers and wrk are: it follows `Connection: close`."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while not stop.is_set():
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert reader is not None
            sent = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError, IndexError) as e:
                failures.append(repr(e))
                return
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.decode(errors="replace"))
            log.append((sent, time.monotonic(), body))
            if b"\r\nconnection: close" in head.lower():
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def request(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return int(head.split()[1]), await reader.readexactly(length)
    finally:
        writer.close()


def requests_counted(p: Plane) -> int:
    """Requests the engine's metrics hold, read the way the daemon reads them (mirror.absorb)."""
    rec = Recorder()
    mirror.absorb(rec, p.run(p.control.metrics(None)))
    return sum(counts[0] for _, _, counts, _, _ in rec.totals())


def wait_for(check: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_switches_under_keepalive_load_fail_nothing(plane: Plane) -> None:
    switches: list[tuple[float, float, bytes]] = []   # (started, acknowledged, new slot)

    async def run() -> tuple[list[tuple[float, float, bytes]], list[str]]:
        stop = asyncio.Event()
        log: list[tuple[float, float, bytes]] = []
        failures: list[str] = []
        tasks = [asyncio.create_task(keepalive_client(plane.port, stop, log, failures)) for _ in range(50)]
        while len(log) < 100 and not failures:
            await asyncio.sleep(0.01)
        slot = "blue"
        for _ in range(24):
            slot = "green" if slot == "blue" else "blue"
            started = time.monotonic()
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.switch(slot), plane.lt.loop))
            switches.append((started, time.monotonic(), slot.encode()))
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        return log, failures

    log, failures = asyncio.run(run())
    assert failures == []
    assert len(log) > 500
    # a switch is acknowledged once new requests go to the new slot
    checked = 0
    for i, (_, done, slot) in enumerate(switches):
        next_start = switches[i + 1][0] if i + 1 < len(switches) else float("inf")
        for sent, _, body in log:
            if done < sent < next_start:
                assert body == slot, f"request after switch {i} answered by {body!r}, not {slot!r}"
                checked += 1
    assert checked > 200
    assert plane.run(plane.control.live()) == switches[-1][2].decode()
    # every request is in the metrics, once
    wait_for(lambda: requests_counted(plane) >= len(log), "the metrics to count every request")
    assert requests_counted(plane) == len(log)


def test_drain_waits_for_slow_requests_then_cuts_at_the_timeout(plane: Plane) -> None:
    async def slow_then_drain() -> tuple[list[tuple[int, bytes]], bool]:
        slow = [asyncio.create_task(request(plane.port, "/slow?ms=700")) for _ in range(3)]
        await wait_inflight("blue", 3)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.switch("green"), plane.lt.loop))
        assert await request(plane.port, "/") == (200, b"green")        # new requests: the new slot
        drained = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            plane.control.drain("blue", 20), plane.lt.loop))
        return list(await asyncio.gather(*slow)), drained

    blue = plane.backends[0]

    async def wait_inflight(slot: str, n: int) -> None:
        """Until the app has received n more request heads (they are in flight through the proxy)."""
        target = seen[0] + n
        while blue.heads < target:
            await asyncio.sleep(0.01)
        seen[0] = target

    seen = [blue.heads]

    answers, drained = asyncio.run(slow_then_drain())
    assert answers == [(200, b"blue")] * 3 and drained is True

    async def hung_then_cut() -> tuple[str, bool]:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.switch("blue"), plane.lt.loop))
        hung = asyncio.create_task(request(plane.port, "/hang"))        # the app never answers it
        await wait_inflight("blue", 1)
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.switch("green"), plane.lt.loop))
        drained = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            plane.control.drain("blue", 0.5), plane.lt.loop))
        try:
            outcome = repr(await asyncio.wait_for(hung, 20))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            outcome = repr(e)
        return outcome, drained

    outcome, drained = asyncio.run(hung_then_cut())
    assert drained is False
    assert "200" not in outcome          # it was cut (closed, or answered by the proxy), never answered


class _WebSocketApp(asyncio.Protocol):
    """Completes a real WebSocket handshake (HAProxy checks Sec-WebSocket-Accept), then echoes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)
        self.buf = b""
        self.open = False

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.t.write(data)
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            key = self.buf.lower().split(b"sec-websocket-key:")[1].split(b"\r\n")[0].strip()
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.open = True


def test_websocket_is_kept_until_it_closes(plane: Plane) -> None:
    async def start_app() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_WebSocketApp, "127.0.0.1", 0)

    app = plane.run(start_app())
    plane.run(plane.control.set_slot("blue", [("127.0.0.1", app.sockets[0].getsockname()[1])]))

    async def run() -> tuple[bytes, bool, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", plane.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.switch("green"), plane.lt.loop))
        drain = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.drain("blue", 60), plane.lt.loop))
        echoes = b""
        for i in range(5):                   # the tunnel still carries data while the drain waits
            writer.write(b"ping%d" % i)
            echoes += await reader.readexactly(5)
            await asyncio.sleep(0.1)
        pending = not drain.done()
        writer.close()                       # the client ends it: now the slot is drained
        return echoes, pending, await asyncio.wait_for(drain, 30)

    echoes, pending, drained = asyncio.run(run())
    app.close()
    assert echoes == b"ping0ping1ping2ping3ping4"
    assert pending and drained is True


def test_a_new_engine_object_adopts_the_running_data_plane(plane: Plane) -> None:
    plane.run(plane.control.switch("green"))
    pid = plane.control.pid

    async def run() -> tuple[list[str], str, Any]:
        stop = asyncio.Event()
        log: list[tuple[float, float, bytes]] = []
        failures: list[str] = []
        tasks = [asyncio.create_task(keepalive_client(plane.port, stop, log, failures)) for _ in range(20)]
        while len(log) < 50 and not failures:
            await asyncio.sleep(0.01)
        # the daemon dies (its engine object with it, and the sockets it had open); a new daemon
        # builds a new one
        old, plane.control = plane.control, plane.new()
        close = getattr(old, "close", None)
        if close is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), plane.lt.loop))
        how = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.ensure(), plane.lt.loop))
        live = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(plane.control.live(), plane.lt.loop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        return failures, how, live

    failures, how, live = asyncio.run(run())
    assert failures == []
    assert how == "adopted" and live == "green" and plane.control.pid == pid
    assert not plane.control.settings_differ
    # it drives what it adopted, and counts from now on without a crash
    assert asyncio.run(request(plane.port, "/")) == (200, b"green")
    assert plane.run(plane.control.switch("blue")) == {"live": "blue", "was": "green"}
    assert asyncio.run(request(plane.port, "/")) == (200, b"blue")
    wait_for(lambda: requests_counted(plane) >= 1, "the adopted engine to count requests")


def test_a_drained_slot_keeps_no_idle_connection_to_its_app(plane: Plane) -> None:
    """An app's graceful stop waits for its open connections: after the drain there are none."""
    blue = plane.backends[0]
    assert asyncio.run(request(plane.port, "/")) == (200, b"blue")
    assert any(not t.is_closing() for t in blue.transports)          # the proxy pools it
    plane.run(plane.control.switch("green"))
    assert plane.run(plane.control.drain("blue", 10)) is True
    wait_for(lambda: all(t.is_closing() for t in blue.transports), "the idle connections to blue to close")
