"""Under HTTPS load, with 0 failed requests: a certificate file change is picked up (and a bad
one refused, the last good certificate still served), switches, and a hand-over to a successor."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from changeover.proxy import tls
from changeover.proxy.embedded import EmbeddedProxy
from tests.proxy.conftest import Backend, LoopThread

from .conftest import Site, client_context, https_get, start_tls_proxy, tls_port, tls_settings
from .load import HttpsLoad


@pytest.fixture(autouse=True)
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "WATCH_INTERVAL", 0.05)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_certificate_change_under_load(lt: LoopThread, tproxy: EmbeddedProxy, site: Site) -> None:
    port = tls_port(tproxy)
    assert tproxy.tls is not None
    with HttpsLoad(port, client_context(site.ca)) as load:
        load.wait_for(200)
        chain, key, serial = site.ca.leaf_pem(["shop.test"])
        # the key first, then the certificate: for a moment they do not match (refused, the old
        # pair keeps serving), then the new pair is swapped in
        _replace(site.shop.key, key)
        load.wait_for(50)
        _replace(site.shop.cert, chain)
        while load.serials[serial] < 20:
            load.wait_for(10)
        # a file that is not a certificate: refused, the last good one keeps serving
        site.shop.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        load.wait_for(20)
        for _ in range(100):
            if lt.call(lambda: dict(tproxy.tls.store.errors)):   # type: ignore[union-attr]
                break
            load.wait_for(5)
        before = load.serials[serial]
        load.wait_for(100)
        assert load.serials[serial] > before             # still the new, good certificate
    assert load.failures == []
    assert load.ok > 400
    errors = lt.call(lambda: dict(tproxy.tls.store.errors))   # type: ignore[union-attr]
    assert str(site.shop.cert) in errors
    assert https_get(port, site.ca, "shop.test").serial == serial
    assert https_get(port, site.ca, "default.test").serial == site.default.serial   # others untouched
    # fixed again: picked up, the error is gone
    chain2, key2, serial2 = site.ca.leaf_pem(["shop.test"])
    _replace(site.shop.key, key2)
    _replace(site.shop.cert, chain2)
    for _ in range(200):
        if https_get(port, site.ca, "shop.test").serial == serial2:
            break
    assert https_get(port, site.ca, "shop.test").serial == serial2
    assert lt.call(lambda: dict(tproxy.tls.store.errors)) == {}   # type: ignore[union-attr]


def test_switches_under_https_load(lt: LoopThread, tproxy: EmbeddedProxy, site: Site) -> None:
    with HttpsLoad(tls_port(tproxy), client_context(site.ca), keepalive=16, fresh=4) as load:
        load.wait_for(100)
        slot = "blue"
        for _ in range(20):
            slot = "green" if slot == "blue" else "blue"
            lt.call(tproxy.switch, slot)
            load.wait_for(20)
    assert load.failures == []
    assert load.bodies[b"blue"] > 100 and load.bodies[b"green"] > 100


def test_handover_of_the_tls_listener_under_load(lt: LoopThread, backends: tuple[Backend, Backend],
                                                 site: Site) -> None:
    old = start_tls_proxy(lt, backends, tls_settings(site), reuse_port=True)
    new: EmbeddedProxy | None = None
    try:
        port = tls_port(old)
        settings = tls_settings(site)
        with HttpsLoad(port, client_context(site.ca)) as load:
            load.wait_for(200)
            from dataclasses import replace

            new = start_tls_proxy(lt, backends, replace(settings, listen=f"127.0.0.1:{port}"), reuse_port=True,
                                  listen=f"127.0.0.1:{old.port}", initial="green")
            cut = lt.run(old.retire(5.0))
            assert cut == 0
            before = load.bodies[b"green"]
            load.wait_for(200)
            assert load.bodies[b"green"] >= before + 200     # everything now goes to the successor
        assert load.failures == []
    finally:
        for p in (old, new):
            if p is not None:
                lt.run(p.close())


def test_websocket_over_tls_through_a_switch(lt: LoopThread, tproxy: EmbeddedProxy, site: Site,
                                             backends: tuple[Backend, Backend]) -> None:
    import socket

    from tests.proxy.conftest import Client, read_head

    ctx = client_context(site.ca)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_port(tproxy)), timeout=5),
                         server_hostname="shop.test") as s:
        c = Client(s)  # type: ignore[arg-type]
        c.sendall(b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert read_head(c)[0] == 101
        assert backends[0].seen[-1].headers["x-forwarded-proto"] == "https"
        c.sendall(b"ping over tls")
        assert c.recv(100) == b"ping over tls"
        lt.call(tproxy.switch, "green")           # the tunnel stays on blue until it closes
        c.sendall(b"still blue")
        assert c.recv(100) == b"still blue"
        assert lt.call(tproxy.inflight, "blue") == 1
    assert https_get(tls_port(tproxy), site.ca, "shop.test").body == b"green"


def test_a_retiring_proxy_waits_for_handshakes_under_way(lt: LoopThread, tproxy: EmbeddedProxy, site: Site) -> None:
    """A TLS connection accepted but not yet through its handshake is not a client yet: retire()
    waits for it (a worker that exited then would cut it), and a handshake that fails is not
    waited for."""
    import gc
    import socket
    import time

    assert tproxy.tls is not None
    port = tls_port(tproxy)
    with socket.create_connection(("127.0.0.1", port)) as bad:
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")       # not TLS: the handshake fails
        bad.recv(100)
    slow = socket.create_connection(("127.0.0.1", port))   # says nothing yet
    deadline = time.monotonic() + 5
    while lt.call(len, tproxy.tls.handshaking) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lt.call(len, tproxy.tls.handshaking) == 1        # the failed one is gone (without a gc)
    fut = asyncio.run_coroutine_threadsafe(tproxy.retire(5), lt.loop)
    time.sleep(0.5)
    assert not fut.done()                                  # waiting for the handshake
    ctx = client_context(site.ca)
    with ctx.wrap_socket(slow, server_hostname="shop.test") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    assert fut.result(5) == 0
    gc.collect()
