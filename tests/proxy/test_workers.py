"""`[proxy] workers = N`: a leader and its followers on one port (proxy/workers.py), real processes.

Switches reach every worker before they are acknowledged (a worker that cannot take one fails it
and the others go back), a follower that disagrees with the leader is put back in line, metrics
add up, a handover replaces the whole group without a failed request, followers leave when their
leader is killed, and a daemon killed in the middle of a switch leaves every worker on one slot.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover import rpc
from changeover.daemon.procs import free_port
from changeover.errors import ChangeoverError
from changeover.proxy.base import ProxySettings
from changeover.proxy.remote import ProxyProcess
from changeover.proxy.workers import merge

from .conftest import Backend, LoopThread


def _initial(backends: tuple[Backend, Backend], live: str = "blue") -> dict[str, Any]:
    blue, green = backends
    return {"slots": {"blue": [list(blue.addr)], "green": [list(green.addr)]},
            "versions": {"blue": "b1", "green": "g1"}, "live": live}


@pytest.fixture
def group(tmp_path: Path, backends: tuple[Backend, Backend]) -> Iterator[ProxyProcess]:
    p = ProxyProcess(ProxySettings(listen=f"127.0.0.1:{free_port()}", workers=2, drain_timeout=5), tmp_path)
    asyncio.run(p.ensure(_initial(backends)))
    try:
        yield p
    finally:
        asyncio.run(p.shutdown())


def _follower_socket(p: ProxyProcess) -> Path:
    return p.state_dir / f"proxy.{p.pid}.1.sock"


def _fresh_gets(port: int, n: int) -> list[bytes]:
    """n requests, each on a new connection (so the kernel spreads them over the workers)."""
    out = []
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        out.append(data.rpartition(b"\r\n\r\n")[2])
    return out


def _ping(p: ProxyProcess) -> dict[str, Any]:
    info = asyncio.run(p.ping())
    assert info is not None
    return info


def test_every_worker_serves_and_switches_together(group: ProxyProcess) -> None:
    assert len(group.pids) == 2 and group.pids[0] == group.pid
    info = _ping(group)
    assert [w["live"] for w in info["workers"]] == ["blue", "blue"]
    assert set(_fresh_gets(group.port or 0, 20)) == {b"blue"}
    assert asyncio.run(group.switch("green"))["live"] == "green"
    # acknowledged: every worker routes to green already, whichever one a new connection lands on
    assert [w["live"] for w in _ping(group)["workers"]] == ["green", "green"]
    assert set(_fresh_gets(group.port or 0, 40)) == {b"green"}
    # both workers took connections, and the leader's metrics add up every worker's
    theirs = asyncio.run(rpc.call(_follower_socket(group), "metrics", {}))
    mine = asyncio.run(group.metrics())
    served = sum(sum(r[1][0] for r in s["rows"]) for s in mine["slots"].values())
    by_follower = sum(sum(r[1][0] for r in s["rows"]) for s in theirs["slots"].values())
    assert served == 60 and 0 < by_follower < 60


def test_a_worker_that_cannot_take_a_switch_fails_it_and_the_others_go_back(group: ProxyProcess) -> None:
    sock = _follower_socket(group)
    away = sock.with_name("unreachable.sock")
    sock.rename(away)                      # the follower cannot be told (it still serves)
    try:
        with pytest.raises(ChangeoverError, match="not acknowledged"):
            asyncio.run(group.switch("green"))
        assert asyncio.run(group.live()) == "blue"
        assert set(_fresh_gets(group.port or 0, 30)) == {b"blue"}
    finally:
        away.rename(sock)
    assert [w["live"] for w in _ping(group)["workers"]] == ["blue", "blue"]


def test_a_follower_that_dies_is_started_again_with_the_routing(group: ProxyProcess) -> None:
    asyncio.run(group.switch("green"))
    dead = group.pids[1]
    os.kill(dead, signal.SIGKILL)
    assert "slots" in asyncio.run(group.metrics())      # the figures do not stop for a dead follower
    deadline = time.monotonic() + 15
    while True:
        pids = _ping(group)["pids"]
        if len(pids) == 2 and dead not in pids and _alive(pids[1]):
            break
        assert time.monotonic() < deadline, "the follower was not started again"
        time.sleep(0.1)
    assert [w["live"] for w in _ping(group)["workers"]] == ["green", "green"]
    assert set(_fresh_gets(group.port or 0, 30)) == {b"green"}


def test_a_follower_that_disagrees_is_put_back_on_the_leaders_slot(group: ProxyProcess) -> None:
    asyncio.run(rpc.call(_follower_socket(group), "switch", {"slot": "green"}))   # as if a switch-back failed
    workers = _ping(group)["workers"]
    assert [w["live"] for w in workers] == ["blue", "blue"]
    assert set(_fresh_gets(group.port or 0, 30)) == {b"blue"}


def test_routing_ops_reach_every_worker(group: ProxyProcess, lt: LoopThread) -> None:
    from .conftest import start_backend
    other = lt.run(start_backend("other"))
    asyncio.run(group.set_slot("green", [other.addr]))
    asyncio.run(group.switch("green"))
    assert set(_fresh_gets(group.port or 0, 30)) == {b"other"}
    r = asyncio.run(rpc.call(_follower_socket(group), "ping"))
    assert r["routing"]["slots"]["green"] == [list(other.addr)]
    assert asyncio.run(group.drain("blue", 2)) is True


def test_handover_to_a_new_group_loses_no_request(group: ProxyProcess, backends: tuple[Backend, Backend]) -> None:
    old = list(group.pids)
    port = group.port or 0
    failures: list[str] = []
    served = [0]

    async def client(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                for _ in range(20):
                    w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    head = await r.readuntil(b"\r\n\r\n")
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await r.readexactly(n)
                    served[0] += 1
                    if b"connection: close" in head.lower():
                        break
                w.close()
            except (OSError, asyncio.IncompleteReadError, IndexError) as e:
                failures.append(repr(e))

    async def go() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client(stop)) for _ in range(10)]
        await asyncio.sleep(0.3)

        async def configure(_: ProxyProcess) -> None:
            pass

        await group.handover(_initial(backends), configure)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())
    assert failures == [] and served[0] > 50
    assert len(group.pids) == 2 and not set(group.pids) & set(old)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in old), "the old group exits once it has handed over"
    assert set(_fresh_gets(port, 10)) == {b"blue"}


def test_a_handover_to_a_larger_group_spreads_over_all_of_it(tmp_path: Path,
                                                               backends: tuple[Backend, Backend]) -> None:
    """One worker hands over to two: once the old listener is gone, its steering program is
    removed, and new connections reach both new workers again (not only the one it picked)."""
    import dataclasses
    p = ProxyProcess(ProxySettings(listen=f"127.0.0.1:{free_port()}", workers=1, drain_timeout=5), tmp_path)
    asyncio.run(p.ensure(_initial(backends)))
    try:
        p.settings = dataclasses.replace(p.settings, workers=2)

        async def configure(_: ProxyProcess) -> None:
            pass

        asyncio.run(p.handover(_initial(backends), configure))
        assert len(p.pids) == 2
        follower = _follower_socket(p)

        def served_by_follower() -> int:
            m = asyncio.run(rpc.call(follower, "metrics", {}))
            return sum(sum(r[1][0] for r in s["rows"]) for s in m["slots"].values())

        deadline = time.monotonic() + 10
        cpus = os.sched_getaffinity(0)
        while True:
            try:
                for cpu in sorted(cpus):                   # handshakes from every CPU
                    os.sched_setaffinity(0, {cpu})
                    assert set(_fresh_gets(p.port or 0, 10)) == {b"blue"}
            finally:
                os.sched_setaffinity(0, cpus)
            total = asyncio.run(p.metrics())
            n = sum(sum(r[1][0] for r in s["rows"]) for s in total["slots"].values())
            if 0 < served_by_follower() < n or time.monotonic() > deadline:
                break
        assert 0 < served_by_follower() < n, "new connections reach both workers of the new group"
    finally:
        asyncio.run(p.shutdown())


def test_followers_leave_when_the_leader_is_killed(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    p = ProxyProcess(ProxySettings(listen=f"127.0.0.1:{free_port()}", workers=3, drain_timeout=5), tmp_path)
    asyncio.run(p.ensure(_initial(backends)))
    pids = list(p.pids)
    assert len(pids) == 3
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
    # the port is free again: the daemon's next start finds it so
    asyncio.run(p.ensure(_initial(backends)))
    try:
        assert set(_fresh_gets(p.port or 0, 5)) == {b"blue"}
    finally:
        asyncio.run(p.shutdown())


def test_merge_adds_every_workers_counts() -> None:
    a = {"now": 10, "slots": {"blue": {"version": "v", "first": 1.0, "run": 0, "sec": 10,
                                       "rows": [[9, [3, 1, 0, 0, 2, 0, 0, 1], [[4, 3]]]],
                                       "routes": {"GET /": {"run": 1, "rows": [[9, [3, 1, 0], [[4, 3]]]]}}}},
         "totals": [["blue", "v", [3, 1, 0, 0, 2, 0, 0, 1], [[4, 3]], 0.3]]}
    b = {"now": 10, "slots": {"blue": {"version": "v", "first": 2.0, "run": 2, "sec": 10,
                                       "rows": [[9, [1, 0, 0, 0, 1, 0, 0, 0], [[5, 1]]],
                                                [10, [1, 0, 0, 0, 1, 0, 0, 0], [[4, 1]]]],
                                       "routes": {"GET /": {"run": 0, "rows": [[9, [1, 0, 0], [[5, 1]]]]}}}},
         "totals": [["blue", "v", [2, 0, 0, 0, 2, 0, 0, 0], [[4, 2]], 0.2]]}
    m = json.loads(json.dumps(merge([a, b])))
    s = m["slots"]["blue"]
    assert s["first"] == 1.0 and s["run"] == 2
    assert s["rows"] == [[9, [4, 1, 0, 0, 3, 0, 0, 1], [[4, 3], [5, 1]]], [10, [1, 0, 0, 0, 1, 0, 0, 0], [[4, 1]]]]
    assert s["routes"]["GET /"] == {"run": 1, "rows": [[9, [4, 1, 0], [[4, 3], [5, 1]]]]}
    assert m["totals"] == [["blue", "v", [5, 1, 0, 0, 4, 0, 0, 1], [[4, 5]], 0.5]]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False

