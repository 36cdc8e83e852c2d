"""The drill route and the health check of the embedded proxy, over real sockets.

A request with `X-Changeover-Drill: <the drill's token>` reaches the drill slot; a wrong token, or
no drill at all, is a public request; the header never reaches the app. A fault on the route is
answered (or delayed) by the proxy and recorded against the drill slot. The health check is the
proxy's own answer, never the app's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover.config import load
from changeover.errors import ChangeoverError, ConfigError
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.fake import FakeControl

from .conftest import Backend, LoopThread, Recorder, get, make_proxy, raw, read_response

TOKEN = "0123456789abcdef0123"


@pytest.fixture
def proxy(lt: LoopThread, backends: tuple[Backend, Backend]) -> Iterator[EmbeddedProxy]:
    p = make_proxy(lt, backends)
    yield p
    lt.run(p.close())


def drill(lt: LoopThread, proxy: EmbeddedProxy, slot: str | None = "green", **fault: float) -> None:
    lt.call(proxy.set_route, "drill", slot, TOKEN if slot else None, fault or None)


def test_only_the_token_reaches_the_drill_slot_and_the_app_never_sees_the_header(
        lt: LoopThread, proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    blue, green = backends
    assert get(proxy.port, "/", f"X-Changeover-Drill: {TOKEN}\r\n")[2] == b"blue"   # no drill yet: public
    drill(lt, proxy)
    status, headers, body = get(proxy.port, "/", f"X-Changeover-Drill: {TOKEN}\r\n")
    assert (status, body, headers["x-changeover-slot"]) == (200, b"green", "green")
    for wrong in ("nope", TOKEN + "x", TOKEN[:-1], ""):
        status, headers, body = get(proxy.port, "/", f"X-Changeover-Drill: {wrong}\r\n")
        assert (status, body) == (200, b"blue") and "x-changeover-slot" not in headers
    assert get(proxy.port, "/", f"X_Changeover_Drill: {TOKEN}\r\n")[2] == b"green"
    assert get(proxy.port, "/")[2] == b"blue"                                      # public: untouched
    for seen in (*blue.seen, *green.seen):
        assert not any(h.replace("_", "-") == "x-changeover-drill" for h in seen.headers), seen.headers
    drill(lt, proxy, None)
    assert get(proxy.port, "/", f"X-Changeover-Drill: {TOKEN}\r\n")[2] == b"blue"


def test_keep_alive_connection_mixes_public_and_drill_requests(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    drill(lt, proxy)
    with raw(proxy.port) as s:
        for hdr, expect in (("", b"blue"), (f"X-Changeover-Drill: {TOKEN}\r\n", b"green"), ("", b"blue"),
                            ("X-Changeover-Drill: guess\r\n", b"blue")):
            s.sendall(f"GET / HTTP/1.1\r\nHost: t\r\n{hdr}\r\n".encode())
            assert read_response(s)[2] == expect


def test_error_fault_is_answered_by_the_proxy_and_recorded_against_the_drill_slot(
        lt: LoopThread, proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    rec = proxy.recorder
    assert isinstance(rec, Recorder)
    green = backends[1]
    drill(lt, proxy, status=500)
    before = len(green.seen)
    with raw(proxy.port) as s:
        for _ in range(3):
            s.sendall(f"GET / HTTP/1.1\r\nHost: t\r\nX-Changeover-Drill: {TOKEN}\r\n\r\n".encode())
            assert read_response(s)[0] == 500
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")                  # public on the same connection
        assert read_response(s)[:3:2] == (200, b"blue")
    assert len(green.seen) == before                                   # the app was not asked
    assert [c[:2] for c in rec.calls if c[0] == "green"][-3:] == [("green", 500)] * 3


def test_latency_fault_delays_drill_requests_only(lt: LoopThread, proxy: EmbeddedProxy,
                                                  backends: tuple[Backend, Backend]) -> None:
    rec = proxy.recorder
    assert isinstance(rec, Recorder)
    drill(lt, proxy, delay=0.3)
    status, _, body = get(proxy.port, "/", f"X-Changeover-Drill: {TOKEN}\r\n")
    assert (status, body) == (200, b"green")
    green_calls = [c for c in rec.calls if c[0] == "green"]
    assert green_calls and green_calls[-1][2] >= 0.25                 # the delay is in what the monitor sees
    assert get(proxy.port, "/")[2] == b"blue"
    # a POST body held back during the delay still arrives whole
    with raw(proxy.port) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: t\r\nX-Changeover-Drill: {TOKEN}\r\nContent-Length: 5\r\n\r\nhel"
                  .encode())
        s.sendall(b"lo")
        status, _, body = read_response(s)
        assert status == 200 and backends[1].seen[-1].body == 5


def test_removing_the_drill_slot_closes_the_route(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    drill(lt, proxy)
    lt.call(proxy.remove_slot, "green")
    assert proxy.drill is None
    assert get(proxy.port, "/", f"X-Changeover-Drill: {TOKEN}\r\n")[2] == b"blue"


def test_bad_routes_are_refused(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    with pytest.raises(ChangeoverError, match="unknown route"):
        lt.call(proxy.set_route, "canary", "green", TOKEN)
    with pytest.raises(ChangeoverError, match="unknown slot"):
        lt.call(proxy.set_route, "drill", "purple", TOKEN)
    with pytest.raises(ChangeoverError, match="token"):
        lt.call(proxy.set_route, "drill", "green", "short")
    with pytest.raises(ChangeoverError, match="fault"):
        lt.call(proxy.set_route, "drill", "green", TOKEN, {"status": 200})


def test_health_check_is_the_proxys_own_answer(lt: LoopThread, proxy: EmbeddedProxy,
                                               backends: tuple[Backend, Backend]) -> None:
    rec = proxy.recorder
    assert isinstance(rec, Recorder)
    seen, calls = len(backends[0].seen), len(rec.calls)
    status, _, body = get(proxy.port, "/_changeover/health")
    assert status == 200 and json.loads(body) == {"ok": True, "live": "blue"}
    lt.call(proxy.set_health, False, "serves v1, the fleet wants v2")
    with raw(proxy.port) as s:                                         # keep-alive: checked again and again
        for _ in range(2):
            s.sendall(b"GET /_changeover/health?from=lb HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = read_response(s)
            assert status == 503 and json.loads(body)["reason"] == "serves v1, the fleet wants v2"
        s.sendall(b"HEAD /_changeover/health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s, head_only=True)[0] == 503
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[2] == b"blue"
    assert len(backends[0].seen) == seen + 1 and len(rec.calls) == calls + 1   # only the app's request
    lt.call(proxy.set_health, True, "")
    lt.call(proxy.switch, None)
    status, _, body = get(proxy.port, "/_changeover/health")
    assert status == 503 and json.loads(body)["reason"] == "nothing is live on this host"
    lt.call(proxy.switch, "blue")
    assert get(proxy.port, "/_changeover/healthz")[0] == 200 and backends[0].seen[-1].path == "/_changeover/healthz"
    assert get(proxy.port, "/_changeover/health", "Content-Length: 0\r\n")[0] == 200


def test_health_check_path_is_configurable(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    for path, reaches_app in (("/lb", False), ("", True)):
        p = make_proxy(lt, backends, health_path=path)
        try:
            status, _, body = get(p.port, "/lb")
            assert (body == b"blue") is reaches_app and status == 200
        finally:
            lt.run(p.close())


def test_health_path_config(tmp_path: Path) -> None:
    f = tmp_path / "changeover.toml"
    f.write_text('[app]\ncommand = ["true"]\n[proxy]\nhealth_path = "/lb/health"\n')
    assert load(f).proxy.health_path == "/lb/health"
    f.write_text('[app]\ncommand = ["true"]\n[proxy]\nhealth_path = "health"\n')
    with pytest.raises(ConfigError, match="health_path"):
        load(f)


def test_fake_routes_like_the_embedded_proxy(lt: LoopThread) -> None:
    fake = FakeControl()

    async def go() -> None:
        await fake.set_slot("blue", [("127.0.0.1", 1)])
        await fake.set_slot("green", [("127.0.0.1", 2)])
        await fake.switch("blue")
        await fake.set_route("drill", "green", TOKEN, {"status": 500})

    lt.run(go())
    assert fake.route_request(TOKEN) == "green" and fake.route_request("wrong") == "blue"
    assert fake.recorder.consecutive_failures("green") == 1
    lt.run(fake.remove_slot("green"))
    assert fake.route_request(TOKEN) == "blue"


def test_the_worker_serves_the_drill_route_and_the_health_op(lt: LoopThread, tmp_path: Path,
                                                             backends: tuple[Backend, Backend]) -> None:
    from changeover.daemon.procs import free_port
    from changeover.proxy.base import ProxySettings
    from changeover.proxy.remote import ProxyProcess

    p = ProxyProcess(ProxySettings(listen=f"127.0.0.1:{free_port()}", drain_timeout=1.0), tmp_path)
    lt.run(p.ensure())
    try:
        for slot, b in zip(("blue", "green"), backends, strict=True):
            lt.run(p.set_slot(slot, [b.addr]))
        lt.run(p.switch("blue"))
        lt.run(p.set_route("drill", "green", TOKEN, {"delay": 0.01}))
        assert get(p.port or 0, "/", f"X-Changeover-Drill: {TOKEN}\r\n")[2] == b"green"
        info = lt.run(p.ping())
        assert info is not None and info["drill"] == {"slot": "green", "status": 0, "delay": 0.01}
        with pytest.raises(ChangeoverError, match="unknown slot"):
            lt.run(p.set_route("drill", "purple", TOKEN))
        lt.run(p.set_health(False, "out of sync"))
        assert get(p.port or 0, "/_changeover/health")[0] == 503
        info = lt.run(p.ping())
        assert info is not None and info["health"] == {"ok": False, "reason": "out of sync"}
    finally:
        lt.run(p.shutdown())
