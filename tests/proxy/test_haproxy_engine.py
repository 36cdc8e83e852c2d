"""HAProxyControl against a real haproxy: process model, truth from HAProxy, reload, headers, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover.errors import ChangeoverError, ConfigError
from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from changeover.proxy import haproxy as hx
from changeover.proxy import haproxy_cli as hcli
from changeover.proxy.base import ProxySettings
from changeover.proxy.engines import make_control
from changeover.proxy.haproxy_engine import HAProxyControl
from changeover.proxy.remote import ProxyProcess

from .conftest import Backend, LoopThread
from .test_engines import keepalive_client, request, wait_for

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="the haproxy binary is not installed")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="co-hx-"))     # short: unix socket paths must fit in 108 bytes
    yield d
    # a test that failed half-way must not leave an HAProxy behind
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((d / "haproxy" / "haproxy.pid").read_text().split()[0])
        if str(d) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


def routing(blue: Backend, green: Backend, live: str | None = "blue") -> dict[str, Any]:
    return {"slots": {"blue": [list(blue.addr)], "green": [list(green.addr)]},
            "versions": {"blue": "v1", "green": "v2"}, "live": live}


@pytest.fixture
def hap(lt: LoopThread, backends: tuple[Backend, Backend], state_dir: Path) -> Iterator[HAProxyControl]:
    c = HAProxyControl(ProxySettings(listen="127.0.0.1:0", engine="haproxy", drain_timeout=5), state_dir)
    assert lt.run(c.ensure(routing(*backends))) == "started"
    yield c
    lt.run(c.shutdown())


def raw_headers(port: int, extra: str = "") -> dict[str, str]:
    async def go() -> dict[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /headers HTTP/1.1\r\nHost: shop.example\r\n{extra}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(n)
        writer.close()
        return dict(eval(body.decode()))   # the test app answers repr(sorted(headers.items()))
    return asyncio.run(go())


def absorbed(lt: LoopThread, c: HAProxyControl) -> Recorder:
    rec = Recorder()
    mirror.absorb(rec, lt.run(c.metrics(None)))
    return rec


def test_factory_picks_the_engine(state_dir: Path) -> None:
    assert isinstance(make_control(ProxySettings(engine="embedded"), state_dir), ProxyProcess)
    assert isinstance(make_control(ProxySettings(engine="haproxy"), state_dir), HAProxyControl)
    with pytest.raises(ConfigError) as e:
        make_control(ProxySettings(engine="nginx"), state_dir)
    assert e.value.key == "proxy.engine"


def test_runs_master_worker_in_its_own_session_from_the_written_config(
        lt: LoopThread, hap: HAProxyControl, state_dir: Path) -> None:
    assert hap.pid is not None
    cfg = (state_dir / "haproxy" / "haproxy.cfg").read_text()
    assert "master-worker" in cfg and "expose-fd listeners" in cfg and "level admin" in cfg
    assert int((state_dir / "haproxy" / "haproxy.pid").read_text().split()[0]) == hap.pid
    assert os.getsid(hap.pid) != os.getsid(0)          # survives the daemon's session
    cmdline = Path(f"/proc/{hap.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-W" in cmdline and b"-S" in cmdline
    info = lt.run(hap.ping())
    assert info is not None and info["live"] == "blue" and info["port"] == _port(hap)


def test_live_is_what_haproxy_says_not_a_cached_guess(lt: LoopThread, hap: HAProxyControl) -> None:
    async def behind_its_back(cmd: str) -> None:
        await hcli.cli(hap.admin, cmd)
    lt.run(behind_its_back("set server changeover/green-1 state ready; set server changeover/blue-1 state drain"))
    assert lt.run(hap.live()) == "green"
    assert asyncio.run(request(_port(hap), "/")) == (200, b"green")
    lt.run(behind_its_back("set server changeover/green-1 state drain"))
    assert lt.run(hap.live()) is None


def test_switch_and_slot_errors(lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    with pytest.raises(ChangeoverError, match="unknown slot"):
        lt.run(hap.switch("red"))
    with pytest.raises(ChangeoverError, match="is live"):
        lt.run(hap.remove_slot("blue"))
    with pytest.raises(ChangeoverError, match="IP address"):
        lt.run(hap.set_slot("green", [("app.internal", 8080)]))
    with pytest.raises(ChangeoverError, match="slot name"):
        lt.run(hap.set_slot("bad-name", [backends[1].addr]))
    assert lt.run(hap.switch(None)) == {"live": None, "was": "blue"}
    assert asyncio.run(request(_port(hap), "/"))[0] == 503
    assert lt.run(hap.switch("green"))["live"] == "green"


def test_remove_slot_closes_its_idle_upstream_connections(
        lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    blue = backends[0]
    assert asyncio.run(request(_port(hap), "/")) == (200, b"blue")
    lt.run(hap.switch("green"))
    assert blue.transports and not all(t.is_closing() for t in blue.transports)   # pooled by HAProxy
    lt.run(hap.remove_slot("blue"))
    wait_for(lambda: all(t.is_closing() for t in blue.transports), "HAProxy to close blue's idle connections")
    with pytest.raises(ChangeoverError, match="unknown slot"):
        lt.run(hap.switch("blue"))


def test_more_upstreams_than_the_pool_use_dynamic_servers(
        lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    green = backends[1]
    ups = [green.addr] + [("127.0.0.1", 40000 + i) for i in range(hx.POOL)]   # 17: one beyond the pool
    lt.run(hap.set_slot("green", ups))
    names = {s.name for s in lt.run(hap._servers()) if s.slot == "green" and not s.parked}
    assert len(names) == hx.POOL + 1
    lt.run(hap.set_slot("green", [green.addr]))                   # shrinking parks the rest
    lt.run(hap.switch("green"))
    assert {asyncio.run(request(_port(hap), "/"))[1] for _ in range(4)} == {b"green"}


def test_forwarded_headers_trust_only_trusted_peers(
        lt: LoopThread, backends: tuple[Backend, Backend], state_dir: Path) -> None:
    spoof = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX_Forwarded_For: 6.6.6.6\r\n"
    for trusted, xff, proto in ((("127.0.0.0/8",), "203.0.113.7, 127.0.0.1", "https"),
                                (("10.0.0.0/8",), "127.0.0.1", "http")):
        c = HAProxyControl(ProxySettings(listen="127.0.0.1:0", trusted_proxies=trusted), state_dir)
        lt.run(c.ensure(routing(*backends)))
        try:
            seen = raw_headers(_port(c), spoof)
            assert seen["x-forwarded-for"] == xff and seen["x-forwarded-proto"] == proto
            assert "x_forwarded_for" not in seen
            assert seen["x-forwarded-host"] == "shop.example" and seen["via"] == "1.1 changeover"
            plain = raw_headers(_port(c))
            assert plain["x-forwarded-for"] == "127.0.0.1" and plain["x-forwarded-proto"] == "http"
        finally:
            lt.run(c.shutdown())


def test_metrics_have_the_mirror_shape_and_match_haproxys_counters(
        lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    async def traffic() -> None:
        for _ in range(20):
            await request(_port(hap), "/")
        for _ in range(5):
            await request(_port(hap), "/status?code=500")
    lt.run(hap.lost())                                   # the counting starts here
    asyncio.run(traffic())
    wait_for(lambda: absorbed(lt, hap).window("blue", 60).requests >= 25, "25 requests in the metrics")
    w = absorbed(lt, hap).window("blue", 60)
    assert (w.version, w.requests, w.errors, w.status["2xx"], w.status["5xx"]) == ("v1", 25, 5, 20, 5)
    assert w.p50 is not None and w.p99 is not None and 0 < w.p50 <= w.p99
    assert lt.run(hap.lost()) == {"served": 25, "logged": 25, "dropped_logs": 0}
    # an upstream that refuses connections: 503 from HAProxy, counted as an upstream failure
    dead = ("127.0.0.1", backends[1].port)
    backends[1].server.close()                           # type: ignore[union-attr]
    lt.run(hap.set_slot("green", [dead]))
    lt.run(hap.switch("green"))
    assert asyncio.run(request(_port(hap), "/"))[0] == 503
    wait_for(lambda: absorbed(lt, hap).window("green", 60).upstream_failures >= 1, "the upstream failure")


def test_a_killed_daemon_leaves_traffic_flowing_and_nothing_is_counted_twice(
        lt: LoopThread, backends: tuple[Backend, Backend], state_dir: Path) -> None:
    """A daemon (here a child process holding the engine) is SIGKILLed under load: HAProxy keeps
    serving; the next engine adopts it, says the truth, and counts each request at most once."""
    settings = ProxySettings(listen="127.0.0.1:0", engine="haproxy")
    child = subprocess.Popen([sys.executable, "-c", _DAEMON, str(state_dir), repr(routing(*backends, live="green"))],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert child.stdout is not None
    port = int(child.stdout.readline())

    async def run() -> list[str]:
        stop = asyncio.Event()
        log: list[tuple[float, float, bytes]] = []
        failures: list[str] = []
        tasks = [asyncio.create_task(keepalive_client(port, stop, log, failures)) for _ in range(20)]
        while len(log) < 500 and not failures:
            await asyncio.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait)
        at_kill = len(log)
        while len(log) < at_kill + 200 and not failures:     # served with no daemon at all
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*tasks)
        return failures

    try:
        failures = asyncio.run(run())
    finally:
        child.kill()
    assert failures == []
    c = HAProxyControl(settings, state_dir)
    try:
        assert lt.run(c.ensure()) == "adopted"
        assert lt.run(c.live()) == "green" and not c.settings_differ
        # the new engine reads the log from its adoption on: what the killed daemon had counted
        # (and what was served while no daemon ran) is not counted again
        assert absorbed(lt, c).totals() == []

        async def ten() -> None:
            for _ in range(10):
                assert await request(port, "/") == (200, b"green")
        asyncio.run(ten())
        wait_for(lambda: absorbed(lt, c).window("green", 60).requests >= 10, "the new engine to count")
        assert absorbed(lt, c).window("green", 60).requests == 10
    finally:
        lt.run(c.shutdown())


_DAEMON = """
import asyncio, ast, sys
from pathlib import Path
from changeover.proxy.base import ProxySettings
from changeover.proxy.haproxy_engine import HAProxyControl
async def main():
    c = HAProxyControl(ProxySettings(listen="127.0.0.1:0", engine="haproxy"), Path(sys.argv[1]))
    await c.ensure(ast.literal_eval(sys.argv[2]))
    print(c.port, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_handover_reloads_without_failing_a_request(
        lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    master = hap.pid
    workers: list[int] = []

    async def configure(p: Any) -> None:
        await p.set_slot("blue", [backends[0].addr])
        await p.set_slot("green", [backends[1].addr])
        await p.switch("blue")

    async def run() -> tuple[list[str], int, tuple[int, bytes]]:
        stop = asyncio.Event()
        log: list[tuple[float, float, bytes]] = []
        failures: list[str] = []
        tasks = [asyncio.create_task(keepalive_client(_port(hap), stop, log, failures)) for _ in range(50)]
        slow = asyncio.create_task(request(_port(hap), "/slow?ms=800"))    # in flight across the reloads
        while len(log) < 100 and not failures:
            await asyncio.sleep(0.01)
        for i in range(5):
            hap.settings = ProxySettings(listen=hap.settings.listen, idle_timeout=30 + i, drain_timeout=5)
            assert hap.settings_differ
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                hap.handover(routing(*backends), configure), lt.loop))
            assert not hap.settings_differ
            info = hcli.parse_info(await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                hcli.cli(hap.admin, "show info"), lt.loop)))
            workers.append(int(info["Pid"]))
            n = len(log)
            while len(log) < n + 50 and not failures:
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*tasks)
        return failures, len(log), await slow

    failures, n, slow = asyncio.run(run())
    assert failures == [] and n > 300
    assert slow == (200, b"blue")
    assert hap.pid == master and len(set(workers)) == 5      # same master, a new worker each time
    # the new worker's log is read, once (green had no traffic before)
    lt.run(hap.switch("green"))

    async def ten() -> None:
        for _ in range(10):
            assert await request(_port(hap), "/") == (200, b"green")
    asyncio.run(ten())
    wait_for(lambda: absorbed(lt, hap).window("green", 60).requests >= 10, "10 requests counted")
    assert absorbed(lt, hap).window("green", 60).requests == 10
    assert "timeout http-keep-alive 34000ms" in (hap.paths.config).read_text()


def test_a_failed_reload_keeps_the_old_config_serving(
        lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    import socket
    before = hap.paths.config.read_text()
    with socket.socket() as taken:                      # the new address is in use: the reload fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        hap.settings = ProxySettings(listen=f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(ChangeoverError):
            lt.run(hap.handover(routing(*backends), lambda p: asyncio.sleep(0)))
    assert hap.paths.config.read_text() == before
    assert asyncio.run(request(_port(hap), "/")) == (200, b"blue")


def test_start_errors_name_the_setting(lt: LoopThread, state_dir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        lt.run(HAProxyControl(ProxySettings(listen="127.0.0.1:0"), state_dir, binary="no-such-haproxy").ensure())
    assert e.value.key == "proxy.engine"
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as e:
            lt.run(HAProxyControl(ProxySettings(listen=f"127.0.0.1:{port}"), state_dir).ensure())
        assert e.value.key == "proxy.listen"


def test_a_state_dir_too_deep_for_haproxys_sockets_still_works(
        lt: LoopThread, backends: tuple[Backend, Backend], state_dir: Path) -> None:
    """HAProxy takes at most 97 bytes for a unix socket's path: a deeper state dir (a CI
    workspace) has them in a short private directory instead (changeover/sockets.py)."""
    deep = state_dir / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    c = HAProxyControl(ProxySettings(listen="127.0.0.1:0", engine="haproxy", drain_timeout=5), deep)
    assert not c.paths.admin.is_relative_to(deep) and len(str(c.paths.admin)) <= 97
    try:
        assert lt.run(c.ensure(routing(*backends))) == "started"
        assert asyncio.run(request(_port(c), "/")) == (200, b"blue")
        lt.run(c.switch("green"))
        assert asyncio.run(request(_port(c), "/")) == (200, b"green")
        # a daemon started again finds the same HAProxy at the same sockets and adopts it
        again = HAProxyControl(ProxySettings(listen=f"127.0.0.1:{_port(c)}", engine="haproxy", drain_timeout=5), deep)
        assert again.paths.admin == c.paths.admin
        assert lt.run(again.ensure(routing(*backends, live="green"))) == "adopted"
    finally:
        lt.run(c.shutdown())


def test_attaches_to_a_running_haproxy_without_owning_it(
        lt: LoopThread, hap: HAProxyControl, backends: tuple[Backend, Backend]) -> None:
    other = Path(tempfile.mkdtemp(prefix="co-hx-att-"))
    try:
        att = HAProxyControl(ProxySettings(listen=f"127.0.0.1:{_port(hap)}", haproxy_socket=str(hap.admin)), other)
        assert lt.run(att.ensure()) == "adopted" and lt.run(att.live()) == "blue"
        assert not att.settings_differ
        assert lt.run(att.switch("green"))["live"] == "green"
        with pytest.raises(ChangeoverError, match="attached"):
            lt.run(att.handover({}, lambda p: asyncio.sleep(0)))
        lt.run(att.shutdown())                                  # not ours: HAProxy keeps running
        assert asyncio.run(request(_port(hap), "/")) == (200, b"green")
        gone = HAProxyControl(ProxySettings(haproxy_socket=str(other / "nothing.sock")), other)
        with pytest.raises(ConfigError) as e:
            lt.run(gone.ensure())
        assert e.value.key == "proxy.haproxy_socket"
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_shutdown_stops_haproxy_and_removes_its_sockets(
        lt: LoopThread, backends: tuple[Backend, Backend], state_dir: Path) -> None:
    c = HAProxyControl(ProxySettings(listen="127.0.0.1:0"), state_dir)
    lt.run(c.ensure(routing(*backends)))
    pid = c.pid
    assert pid is not None
    lt.run(c.shutdown())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes()[:64],
             "HAProxy to exit")
    assert sorted(p.name for p in (state_dir / "haproxy").iterdir()) == ["haproxy.cfg"]
    assert lt.run(c.ping()) is None


def test_log_lines_parse() -> None:
    assert hcli.parse_log(b"co|green-3|200|1520|1|--") == ("green", 200, 0.00152, False)
    assert hcli.parse_log(b"co|<NOSRV>|503|80|-1|SC") == ("", 503, 0.00008, True)
    assert hcli.parse_log(b"co|blue-1|101|9000000|4|--") == ("blue", 101, 0.004, False)
    assert hcli.parse_log(b"co|blue-1|504|-|60000|sH") == ("blue", 504, 60.0, True)
    assert hcli.parse_log(b"co|blue-1|-1|-|-1|CR") == ("blue", 0, 0.0, False)       # the client went away
    assert hcli.parse_log(b"Server changeover/blue-1 is UP") is None
    assert hcli.parse_log(b"co|blue-1|2x0|1|1|--") is None


def _port(c: HAProxyControl) -> int:
    assert c.port is not None
    return c.port
