"""A slot that is removed, or whose instances are replaced, lets go of its app connections, so an
app that shuts down gracefully (stop accepting, wait for open connections to end, exit) can exit.

The app is a real process that does what Node's `server.close()` (before v19) and many other
servers do on SIGTERM: it waits for every open connection, idle keep-alive ones included.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import LoopThread, raw, read_response

APP = r"""
import asyncio, signal, sys

async def main():
    conns = set()
    closing = asyncio.Event()

    async def serve(reader, writer):
        conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/slow" in head.split(b"\r\n", 1)[0]:
                    await asyncio.sleep(0.3)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            conns.discard(writer)
            writer.close()
            if closing.is_set() and not conns:
                sys.exit(0)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)

    def graceful():
        closing.set()
        server.close()          # no new connections; the open ones may finish
        if not conns:
            sys.exit(0)

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, graceful)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class App:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", APP], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stops_gracefully(self, timeout: float = 15) -> bool:
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return self.proc.returncode == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def apps() -> Iterator[list[App]]:
    started: list[App] = []
    yield started
    for a in started:
        a.kill()


def wait_inflight(lt: LoopThread, proxy: EmbeddedProxy, slot: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while lt.call(proxy.inflight, slot) != n:
        assert time.monotonic() < deadline, f"slot {slot} never had {n} request(s) in flight"
        time.sleep(0.01)


def test_removed_slot_closes_connections_busy_at_removal(lt: LoopThread, proxy: EmbeddedProxy,
                                                         apps: list[App]) -> None:
    app = App()
    apps.append(app)
    lt.call(proxy.set_slot, "blue", [app.addr])
    with raw(proxy.port) as idle, raw(proxy.port) as busy:
        idle.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")       # a pooled, idle app connection
        assert read_response(idle)[2] == b"ok"
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_inflight(lt, proxy, "blue", 1)
        lt.call(proxy.switch, "green")
        lt.call(proxy.remove_slot, "blue")                        # while /slow is still running
        assert read_response(busy)[2] == b"ok"                    # it finishes...
    assert app.stops_gracefully()                                 # ...and its connection is let go


def test_replaced_instances_are_let_go(lt: LoopThread, proxy: EmbeddedProxy, apps: list[App]) -> None:
    old, new = App(), App()
    apps += [old, new]
    lt.call(proxy.set_slot, "blue", [old.addr])
    with raw(proxy.port) as s, raw(proxy.port) as busy:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[2] == b"ok"
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_inflight(lt, proxy, "blue", 1)
        lt.call(proxy.set_slot, "blue", [new.addr])               # e.g. an instance restarted elsewhere
        assert read_response(busy)[2] == b"ok"
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[2] == b"ok"                       # served by the new instance
    assert old.stops_gracefully()
