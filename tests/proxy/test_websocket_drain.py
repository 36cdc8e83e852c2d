"""WebSocket tunnels the proxy must end get a close frame 1001 (going away), never a bare TCP close
(1006), and a slot holding only tunnels does not hold up a drain or a deploy.

Proxy level: a real RFC 6455 echo app on asyncio (it records the close frames it receives) behind a
real proxy, and a raw-socket WebSocket client. Daemon level: the example app's /ws echo, real
daemons, deploys, and the daemon killed (SIGKILL, SIGTERM) while a retired standby's processes
still serve tunnels.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.websocket import FrameTracker, close_frame
from changeover.state import State

from .conftest import LoopThread, Recorder, until

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- a real WebSocket echo app ----------------------------------------------------------------------
class WsApp:
    """Echoes data frames; answers a close frame with a close frame carrying the same code and
    records it. A text message "partial:N" makes it send a binary frame header announcing N bytes
    and only half of the payload (a frame the proxy is still relaying when it must cut)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.closes: list[int] = []        # close codes received from the proxy
        self.eofs = 0                      # connections that ended

    @property
    def addr(self) -> tuple[str, int]:
        assert self.server is not None
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            key = next(ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
                       if ln.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            partial = False                # a frame of ours is unfinished: no close frame can follow
            while True:
                op, payload = await read_frame(r, masked=True)
                if op == 8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    self.closes.append(code)
                    if partial:            # stays open: the proxy has to give up on the frame
                        continue
                    w.write(close_frame(code, masked=False))
                    await w.drain()
                    break
                if op == 1 and payload.startswith(b"partial:"):
                    n = int(payload[8:])
                    w.write(bytes((0x82, 127)) + struct.pack("!Q", n) + b"p" * (n // 2))
                    partial = True
                    continue
                w.write(frame(op, payload, masked=False))
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            pass
        finally:
            self.eofs += 1
            w.close()


async def read_frame(r: asyncio.StreamReader, masked: bool) -> tuple[int, bytes]:
    b0, b1 = await r.readexactly(2)
    assert bool(b1 & 0x80) == masked, "a frame masked the wrong way for its direction"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await r.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await r.readexactly(8))[0]
    key = await r.readexactly(4) if masked else b"\0\0\0\0"
    data = await r.readexactly(n)
    if masked:
        data = bytes(b ^ key[i & 3] for i, b in enumerate(data))
    return b0 & 0x0F, data


def frame(op: int, payload: bytes, masked: bool) -> bytes:
    n = len(payload)
    ln = bytes((n,)) if n < 126 else b"\x7e" + struct.pack("!H", n) if n < 65536 else b"\x7f" + struct.pack("!Q", n)
    if not masked:
        return bytes((0x80 | op, ln[0])) + ln[1:] + payload
    key = os.urandom(4)
    return bytes((0x80 | op, 0x80 | ln[0])) + ln[1:] + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


# -- a raw-socket WebSocket client --------------------------------------------------------------------
class WsClient:
    def __init__(self, port: int, path: str = "/ws", timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])
        assert self.status == 101, head

    def _more(self) -> None:
        d = self.sock.recv(1 << 20)
        if not d:
            raise EOFError("closed")
        self.buf += d

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, payload: bytes, op: int = 2) -> None:
        self.sock.sendall(frame(op, payload, masked=True))

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._take(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._take(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._take(8))[0]
        return b0 & 0x0F, self._take(n)

    def close_code(self) -> int:
        """The code of the close frame the server sends next: 1006 if the connection ends without
        one (what a browser reports)."""
        try:
            while True:
                op, data = self.recv()
                if op == 8:
                    return int(struct.unpack("!H", data[:2])[0]) if len(data) >= 2 else 1005
        except (EOFError, ConnectionError):
            return 1006

    def rest(self) -> bytes:
        """Everything until the connection ends."""
        out = self.buf
        self.buf = b""
        while True:
            try:
                d = self.sock.recv(1 << 20)
            except ConnectionError:
                return out
            if not d:
                return out
            out += d

    def close(self) -> None:
        self.sock.close()


# -- proxy-level fixtures -------------------------------------------------------------------------------
@pytest.fixture
def apps(lt: LoopThread) -> Iterator[tuple[WsApp, WsApp]]:
    blue, green = WsApp(), WsApp()

    async def start() -> None:
        for a in (blue, green):
            a.server = await asyncio.start_server(a.handle, "127.0.0.1", 0)

    lt.run(start())
    yield blue, green
    for a in (blue, green):
        assert a.server is not None
        lt.loop.call_soon_threadsafe(a.server.close)


def ws_proxy(lt: LoopThread, apps: tuple[WsApp, WsApp], **kw: Any) -> EmbeddedProxy:
    p = EmbeddedProxy(ProxySettings(listen="127.0.0.1:0", **kw), Recorder())
    lt.run(p.start())
    lt.call(p.set_slot, "blue", [apps[0].addr])
    lt.call(p.set_slot, "green", [apps[1].addr])
    lt.call(p.switch, "blue")
    return p


@pytest.fixture
def wsp(lt: LoopThread, apps: tuple[WsApp, WsApp]) -> Iterator[EmbeddedProxy]:
    p = ws_proxy(lt, apps)
    yield p
    lt.run(p.close())


# -- frame tracking -----------------------------------------------------------------------------------------
def test_frame_tracker_follows_boundaries_across_any_split() -> None:
    frames = [frame(2, b"x" * n, masked=m) for n, m in ((0, True), (5, False), (125, True), (126, True),
                                                         (70000, False), (3, True))]
    stream = b"".join(frames)
    ends = set()
    pos = 0
    for f in frames:
        pos += len(f)
        ends.add(pos)
    for step in (1, 2, 3, 7, 13, 4096, len(stream)):
        t = FrameTracker()
        pos = 0
        while pos < len(stream):
            chunk = stream[pos:pos + step]
            t.feed(chunk)
            pos += len(chunk)
            assert t.at_boundary == (pos in ends), (step, pos)
    # with stop: the offset of the first boundary, nothing consumed past it
    t = FrameTracker()
    t.feed(stream[:3])                      # inside the first... second frame's header
    k = t.feed(stream[3:], stop=True)
    assert k >= 0 and 3 + k in ends and t.at_boundary
    assert not FrameTracker().feed(b"", stop=True)


def test_frame_tracker_gives_up_on_what_is_not_frames() -> None:
    t = FrameTracker()
    t.feed(b"early bytes")                  # RSV bits set: an extension, or not WebSocket at all
    assert t.broken and not t.at_boundary
    t = FrameTracker()
    t.feed(close_frame(masked=True))
    assert t.closed and t.at_boundary


# -- the proxy ------------------------------------------------------------------------------------------------
def test_drain_limit_sends_1001_both_ways(lt: LoopThread, wsp: EmbeddedProxy, apps: tuple[WsApp, WsApp]) -> None:
    ws = WsClient(wsp.port)
    try:
        ws.send(b"hello")
        assert ws.recv() == (2, b"hello")
        lt.call(wsp.switch, "green")
        t0 = time.monotonic()
        r = lt.run(wsp.drain_requests("blue", 0.6))
        assert time.monotonic() - t0 < 0.3              # tunnels only: not waited for
        assert r["clean"] and r["tunnels"] == 1 and r["websockets"] == 1 and 0.3 < r["limit_in"] <= 0.61
        ws.send(b"still here")                          # the grace: the tunnel still works
        assert ws.recv() == (2, b"still here")
        assert ws.close_code() == 1001                  # at the drain limit: going away, not 1006
        ws.send(struct.pack("!H", 1001), op=8)          # the client answers it, as browsers do...
        assert ws.buf == b"" and ws.sock.recv(100) == b""   # ...and sees the proxy's FIN, not a reset
    finally:
        ws.close()
    until(lambda: apps[0].closes == [1001])        # the app got a masked close frame 1001 too
    until(lambda: lt.call(wsp.inflight, "blue") == 0)


def test_drain_waits_for_requests_but_not_for_tunnels(lt: LoopThread, wsp: EmbeddedProxy) -> None:
    ws = WsClient(wsp.port)
    try:
        lt.call(wsp.switch, "green")
        r = lt.run(wsp.drain_requests("blue", 5))
        assert r["tunnels"] == 1
        r = lt.run(wsp.drain_requests("green", 5))      # nothing there: clean, no tunnels
        assert r == {"clean": True, "tunnels": 0, "websockets": 0, "limit_in": 0.0}
        assert lt.run(wsp.drain("blue", 0.2)) is False  # the full drain still cuts at its timeout...
        assert ws.close_code() == 1001                  # ...with 1001
    finally:
        ws.close()


def test_idle_tunnel_is_closed_with_1001(lt: LoopThread, apps: tuple[WsApp, WsApp]) -> None:
    p = ws_proxy(lt, apps, tunnel_idle_timeout=0.4)
    try:
        busy, idle = WsClient(p.port), WsClient(p.port)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.9:              # bytes keep flowing: never idle
            busy.send(b"ping")
            assert busy.recv() == (2, b"ping")
            time.sleep(0.05)
        assert idle.close_code() == 1001
        busy.send(b"ping")
        assert busy.recv() == (2, b"ping")              # the busy one is still open
        assert busy.close_code() == 1001                # until it is idle in turn
        busy.close()
        idle.close()
    finally:
        lt.run(p.close())
    until(lambda: apps[0].closes == [1001, 1001])


def test_cut_waits_for_a_frame_in_flight_to_end(lt: LoopThread, wsp: EmbeddedProxy,
                                                apps: tuple[WsApp, WsApp]) -> None:
    ws = WsClient(wsp.port)
    try:
        payload = b"y" * 1000
        whole = frame(2, payload, masked=True)
        ws.sock.sendall(whole[:200])                    # a frame half sent: the app side is mid-frame
        time.sleep(0.05)                                # (let the proxy relay it)
        lt.call(wsp.switch, "green")
        lt.run(wsp.drain_requests("blue", 0.1))
        assert ws.close_code() == 1001                  # the client side is at a boundary: at once
        ws.sock.sendall(whole[200:])                    # the frame ends within WS_CUT_WAIT...
    finally:
        ws.close()
    until(lambda: apps[0].closes == [1001])        # ...then the app gets its close frame, after it


def test_frame_that_does_not_end_is_cut_without_a_close_frame(lt: LoopThread, wsp: EmbeddedProxy,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ws = WsClient(wsp.port)
    try:
        ws.send(b"partial:4000", op=1)                  # the app starts a frame and stops halfway
        while len(ws.buf) < 2010:                       # header (10) and the first half
            ws._more()
        lt.call(wsp.switch, "green")
        lt.run(wsp.drain_requests("blue", 0.1))
        got = ws.rest()                                 # nothing injected into the payload
        assert got == bytes((0x82, 127)) + struct.pack("!Q", 4000) + b"p" * 2000
    finally:
        ws.close()
    # given WS_CUT_WAIT to end, it did not: closed without a close frame, and the log says so
    assert "without a close frame to the client" in caplog.text


def test_other_upgrades_are_closed_without_a_frame(lt: LoopThread, wsp: EmbeddedProxy,
                                                   apps: tuple[WsApp, WsApp]) -> None:
    s = socket.create_connection(("127.0.0.1", wsp.port), timeout=5)
    try:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nUpgrade: something-else\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        lt.call(wsp.switch, "green")
        r = lt.run(wsp.drain_requests("blue", 0.1))
        assert r["tunnels"] == 1 and r["websockets"] == 0
        assert s.recv(100) == b""                       # closed, no WebSocket frame
    finally:
        s.close()


def test_shutdown_sends_1001(lt: LoopThread, apps: tuple[WsApp, WsApp]) -> None:
    p = ws_proxy(lt, apps)
    ws = WsClient(p.port)
    try:
        ws.send(b"x")
        assert ws.recv() == (2, b"x")
        lt.run(p.close())
        assert ws.close_code() == 1001
    finally:
        ws.close()


# -- the HAProxy engine ------------------------------------------------------------------------------------
def test_haproxy_drain_does_not_wait_for_tunnels(lt: LoopThread, apps: tuple[WsApp, WsApp]) -> None:
    """HAProxy tells tunnels apart too (`show sess all`: answered 101), so its drain does not wait
    for them either; it cannot send a close frame, and says so."""
    if shutil.which("haproxy") is None:
        pytest.skip("the haproxy binary is not installed (scripts/ensure-services.sh installs it)")
    from changeover.proxy.haproxy_engine import HAProxyControl

    d = Path(tempfile.mkdtemp(prefix="co-ws-"))    # short: unix socket paths must fit in 108 bytes
    c = HAProxyControl(ProxySettings(listen="127.0.0.1:0", engine="haproxy", drain_timeout=5), d)
    blue, green = apps
    try:
        lt.run(c.ensure({"slots": {"blue": [list(blue.addr)], "green": [list(green.addr)]},
                         "versions": {"blue": "v1", "green": "v2"}, "live": "blue"}))
        assert c.port is not None
        ws = WsClient(c.port)
        try:
            ws.send(b"via haproxy")
            assert ws.recv() == (2, b"via haproxy")
            lt.run(c.switch("green"))
            t0 = time.monotonic()
            r = lt.run(c.drain_requests("blue", 5))
            assert time.monotonic() - t0 < 3                # not the 5 s drain timeout
            assert r["tunnels"] == 1 and r["close_frame"] is False and 0 < r["limit_in"] <= 5
            ws.send(b"still here")
            assert ws.recv() == (2, b"still here")
        finally:
            ws.close()
        until(lambda: lt.run(c.inflight("blue")) == 0)
        assert lt.run(c.drain_requests("blue", 5)) == {"clean": True, "tunnels": 0, "websockets": 0,
                                                         "limit_in": 0.0}
    finally:
        lt.run(c.shutdown())
        shutil.rmtree(d, ignore_errors=True)


def test_haproxy_session_list_is_read_for_tunnels() -> None:
    from changeover.proxy import haproxy as hx
    from changeover.proxy import haproxy_cli as hcli

    block = ("0x5: [01/Dec/2026:15:46:50.196779] id=0 proto=tcpv4 source=127.0.0.1:48510\n"
             "  frontend=fe (id=2 mode=http), listener=? (id=1) addr=127.0.0.1:18771\n"
             "  backend={be} (id=3 mode=http) addr=127.0.0.1:57104\n"
             "  server={srv} (id=1) addr=127.0.0.1:18772\n"
             "  txn=0x5 flags=0x8000 meth=1 status={st} req.st=MSG_TUNNEL rsp.st=MSG_TUNNEL\n")
    out = "".join(block.format(be=be, srv=srv, st=st) for be, srv, st in
                  ((hx.BACKEND, "blue-1", 101), (hx.BACKEND, "blue-1", 101), (hx.BACKEND, "blue-2", 200),
                   ("other", "blue-1", 101)))
    assert hcli.parse_tunnels(out) == {"blue-1": 2}


# -- the daemon -------------------------------------------------------------------------------------------------
DRAIN_TIMEOUT = 4.0


def _project(tmp: Any) -> Any:
    from tests.daemon.harness import Project

    p = Project(tmp)
    p.write()
    p.config.write_text(p.config.read_text().replace('drain_timeout = "5s"', f'drain_timeout = "{DRAIN_TIMEOUT:g}s"'))
    return p


@pytest.fixture
def project(tmp_path: Any) -> Iterator[Any]:
    p = _project(tmp_path)
    try:
        yield p
    finally:
        p.teardown()


def _linger(project: Any) -> list[dict[str, Any]]:
    st = State(project.root / ".changeover" / "state.db", readonly=True)
    try:
        t = st.timer("tunnel_linger")
        return list(t[1]["groups"]) if t else []
    finally:
        st.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _setup_standby_with_tunnel(project: Any) -> WsClient:
    """v1 deployed, a WebSocket to it, v2 deployed: blue (v1) is the standby holding the tunnel."""
    project.start_daemon()
    project.deploy("v1", "--wait")
    ws = WsClient(project.port, timeout=15)
    ws.send(b"hi")
    assert ws.recv() == (2, b"hi")
    project.deploy("v2", "--wait")
    ws.send(b"on the standby")
    assert ws.recv() == (2, b"on the standby")
    return ws


def _events(project: Any, kind: str) -> list[dict[str, Any]]:
    st = State(project.root / ".changeover" / "state.db", readonly=True)
    try:
        return [e for e in st.events(200) if e["kind"] == kind]
    finally:
        st.close()


def _after_the_limit(project: Any, ws: WsClient, pids: list[int], live: str) -> None:
    """The proxy (which outlived any daemon) closes the tunnel with 1001 at the drain limit; the
    daemon then stops the processes kept for it; the live release serves, reconnects included."""
    # the tunnel works until the limit (a slow restart may come after it: then the 1001 is there)
    with contextlib.suppress(OSError):
        ws.send(b"grace")
    assert ws.close_code() == 1001                      # going away at the drain limit, not 1006
    until(lambda: not _linger(project), timeout=15)
    assert not any(_alive(p) for p in pids)             # the processes kept for it are stopped
    assert _events(project, "drain.tunnels_stopped")
    st = project.status()
    assert st["live"]["version"] == live and st["deploying"] is False and "tunnels_kept" not in st
    ws2 = WsClient(project.port)                        # clients reconnect: to the live release
    ws2.send(b"again")
    assert ws2.recv() == (2, b"again")
    ws2.close()


def test_deploy_does_not_wait_for_a_standby_holding_only_tunnels_then_sigterm(project: Any) -> None:
    """The deploy returns without waiting for the standby's tunnel and says so; the daemon is then
    stopped (SIGTERM) and started again while the tunnel is in its grace."""
    ws = _setup_standby_with_tunnel(project)
    try:
        done = project.deploy("v3", "--wait")
        out = done.stdout + done.stderr                 # progress goes to stderr
        assert "standby blue holds 1 WebSocket tunnel only: not waiting; they get 1001 at the drain limit" \
            in out, out
        groups = _linger(project)
        assert [g["slot"] for g in groups] == ["blue"] and groups[0]["version"] == "v1"
        pids = [r["pid"] for r in groups[0]["records"]]
        ev = _events(project, "drain.tunnels")[0]
        assert ev["tunnels"] == 1 and ev["websockets"] == 1 and ev["version"] == "v1"
        if time.time() < ev["ts"] + ev["limit_in"] - 0.5:   # (a loaded machine may take longer to deploy)
            assert pids and all(_alive(p) for p in pids)    # v1 still serves its tunnel
            assert [(k["slot"], k["version"], k["tunnels"]) for k in project.status()["tunnels_kept"]] == \
                [("blue", "v1", 1)]
            assert "tunnels: 1 on v1 (retired from blue)" in project.cli("status").stdout
            ws.send(b"grace")
            assert ws.recv() == (2, b"grace")           # the deploy is done: the tunnel still works
        project.kill_daemon(signal.SIGTERM)
        project.start_daemon()
        _after_the_limit(project, ws, pids, "v3")
        h = json.loads(project.cli("history", "--json").stdout)[0]
        assert h["version"] == "v3" and h["state"] == "succeeded"
    finally:
        ws.close()


def test_daemon_killed_inside_the_retire_step_that_kept_tunnels(project: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL inside the retire step, after it acted: v1's processes are kept for the tunnel and
    the deployment of v3 is interrupted before anything users see changed."""
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "retire:30")   # v1 and v2 retire nothing
    ws = _setup_standby_with_tunnel(project)
    try:
        deploy = subprocess.Popen([sys.executable, "-m", "changeover", "deploy", "v3", "--path",
                                   str(project.release("v3")), "--wait", "-c", str(project.config)],
                                  cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Inside the held retire step once it has acted: the processes kept and the event written
        # (the timer is written first: killed between the two, the event would never be there).
        until(lambda: bool(_linger(project)) and bool(_events(project, "drain.tunnels")), timeout=30)
        pids = [r["pid"] for r in _linger(project)[0]["records"]]
        project.kill_daemon(signal.SIGKILL)
        monkeypatch.delenv("CHANGEOVER_TEST_STEP_DELAY")
        deploy.wait(timeout=30)
        project.start_daemon()
        ev = _events(project, "drain.tunnels")[0]
        if time.time() < ev["ts"] + ev["limit_in"]:     # (a slow restart may come after the limit)
            assert all(_alive(p) for p in pids)         # recovery did not take them for orphans
        _after_the_limit(project, ws, pids, "v2")
        h = json.loads(project.cli("history", "--json").stdout)[0]
        assert h["version"] == "v3" and h["state"] == "failed"
        project.deploy("v3", "--wait")                  # and the next deploy works
        assert project.status()["live"]["version"] == "v3"
    finally:
        ws.close()
