"""The upstream pool follows demand: a steady load above any fixed idle cap opens no new app
connections after warm-up (connections counted where they are accepted: at the backend), the
bound is `[proxy] max_idle_per_instance`, and idle connections left over after a peak are closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.upstream import Upstream

from .conftest import Backend, LoopThread, make_proxy

CLIENTS = 600          # above the 512 idle connections per instance the pool used to keep


async def _client(port: int, rounds: int, gate: asyncio.Barrier, failures: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(rounds):
            await gate.wait()              # every client's request is in flight at once
            # the app holds each answer long enough that all CLIENTS need a connection at once,
            # even when a busy machine takes a while to send the last of them (30 ms was not)
            writer.write(b"GET /slow?ms=200 HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.decode())
    finally:
        writer.close()


def _load(port: int, rounds: int, clients: int = CLIENTS) -> list[str]:
    async def go() -> list[str]:
        failures: list[str] = []
        gate = asyncio.Barrier(clients)
        await asyncio.gather(*(_client(port, rounds, gate, failures) for _ in range(clients)))
        return failures
    return asyncio.run(go())


@pytest.fixture
def big_proxy(lt: LoopThread, backends: tuple[Backend, Backend]) -> Iterator[EmbeddedProxy]:
    p = make_proxy(lt, backends)
    yield p
    lt.run(p.close())


def test_steady_load_above_the_old_cap_opens_no_connections(lt: LoopThread, big_proxy: EmbeddedProxy,
                                                            backends: tuple[Backend, Backend]) -> None:
    blue = backends[0]
    assert _load(big_proxy.port, 2) == []           # warm-up: the pool grows to the concurrency
    warm = blue.conns
    assert warm >= CLIENTS * 0.9                    # the load really needed that many at once
    assert _load(big_proxy.port, 6) == []           # 6 more rounds, each with all CLIENTS in flight
    # new connections come only from fresh clients' first round races; churn would be ~88 a round
    assert blue.conns - warm <= 10, f"{blue.conns - warm} new app connections under a steady load"
    up = big_proxy.slots["blue"].upstreams[0]
    assert len(lt.call(lambda: list(up.idle))) >= CLIENTS * 0.9


def test_idle_bound_is_max_idle_per_instance(lt: LoopThread, backends: tuple[Backend, Backend]) -> None:
    p = make_proxy(lt, backends, max_idle_per_instance=50)
    try:
        assert _load(p.port, 2, clients=150) == []
        up = p.slots["blue"].upstreams[0]
        assert lt.call(lambda: len(up.idle)) <= 50
        assert up.max_idle == 50
    finally:
        lt.run(p.close())


def test_the_pool_shrinks_back_after_a_peak(lt: LoopThread, big_proxy: EmbeddedProxy) -> None:
    assert _load(big_proxy.port, 1, clients=100) == []
    up: Upstream = big_proxy.slots["blue"].upstreams[0]

    def trim() -> tuple[int, int]:
        before = len(up.idle)
        newest = max(c.idle_since for c in up.idle)
        for c in up.idle[:40]:             # the 40 coldest went unused for longer than IDLE_TTL
            c.idle_since = newest - 1000
        up.trim(newest + 1)
        return before, len(up.idle)

    before, after = lt.call(trim)
    assert before >= 90 and after == before - 40
    assert _load(big_proxy.port, 1, clients=20) == []   # what is left still serves


def test_max_idle_per_instance_in_config(tmp_path: object) -> None:
    from pathlib import Path

    from changeover.config import load
    from changeover.errors import ConfigError

    d = Path(str(tmp_path))
    (d / "changeover.toml").write_text('[app]\ncommand = ["x"]\n[proxy]\nmax_idle_per_instance = 2000\nworkers = 3\n')
    cfg = load(d / "changeover.toml")
    assert cfg.proxy.max_idle_per_instance == 2000 and cfg.proxy.workers == 3
    (d / "changeover.toml").write_text('[app]\ncommand = ["x"]\n[proxy]\nmax_idle_per_instance = 0\n')
    with pytest.raises(ConfigError) as e:
        load(d / "changeover.toml")
    assert "max_idle_per_instance" in str(e.value)
    (d / "changeover.toml").write_text('[app]\ncommand = ["x"]\n')
    assert load(d / "changeover.toml").proxy.workers >= 1
