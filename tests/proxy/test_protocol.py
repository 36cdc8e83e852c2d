"""The daemon's handle on the proxy worker (`ProxyProcess`) against real worker processes: the
versioned control protocol, adoption across versions, start failures, shutdown."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover import rpc
from changeover.daemon.procs import free_port
from changeover.errors import ConfigError, DaemonError
from changeover.proxy import ops
from changeover.proxy.base import ProxySettings
from changeover.proxy.control import PROXY_PROTOCOL
from changeover.proxy.remote import ProxyProcess

from .conftest import Backend, LoopThread, get

# A worker of another protocol version: the real worker, told it speaks `version`. Version 1 is
# a worker from before versioning: its ping has neither "protocol" nor "routing"; `bare` makes
# a worker of another version that does not report its routing either.
OTHER = r"""
import dataclasses, os, sys
from changeover.proxy import ops, worker
ops.PROTOCOL = int(sys.argv[1])
if ops.PROTOCOL == ops.UNVERSIONED or sys.argv[2] == "bare":
    async def ping(self, args, emit):
        out = {"pid": os.getpid(), "port": self.proxy.port, "live": self.proxy.live,
               "settings": dataclasses.asdict(self.settings)}
        if ops.PROTOCOL != ops.UNVERSIONED:
            out["protocol"] = ops.PROTOCOL
        return out
    worker.Worker.ping = ping
worker.main(sys.argv[3:])
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def settings() -> ProxySettings:
    return ProxySettings(listen=f"127.0.0.1:{free_port()}", drain_timeout=2.0)


@pytest.fixture
def workers() -> Iterator[list[int]]:
    """Pids to kill at the end, whatever the test did."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def start_other(version: int, state_dir: Path, settings: ProxySettings, initial: dict[str, Any],
                bare: bool = False) -> int:
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", OTHER, str(version), "bare" if bare else "-", "--socket", str(state_dir / "proxy.sock"),
         "--settings", json.dumps(dataclasses.asdict(settings)), "--initial", json.dumps(initial)],
        stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    msg = json.loads(proc.stdout.readline())
    assert msg["ready"], msg
    return int(msg["pid"])


def test_ping_speaks_the_protocol(lt: LoopThread, tmp_path: Path, settings: ProxySettings,
                                  backends: tuple[Backend, Backend], workers: list[int]) -> None:
    p = ProxyProcess(settings, tmp_path)
    assert lt.run(p.ensure()) == "started"
    assert p.pid is not None
    workers.append(p.pid)
    lt.run(p.set_slot("blue", [backends[0].addr]))
    lt.run(p.set_version("blue", "v1"))
    assert lt.run(p.switch("blue")) == {"live": "blue", "was": None}
    info = lt.run(p.ping())
    assert info is not None
    assert info["protocol"] == PROXY_PROTOCOL == ops.PROTOCOL
    assert info["routing"] == {"slots": {"blue": [list(backends[0].addr)]}, "versions": {"blue": "v1"},
                               "live": "blue"}
    assert not p.settings_differ                     # settings survive the JSON round trip
    # a second handle adopts it
    again = ProxyProcess(settings, tmp_path)
    assert lt.run(again.ensure()) == "adopted" and again.pid == p.pid
    lt.run(p.shutdown())


def test_every_op_is_served(lt: LoopThread, tmp_path: Path, settings: ProxySettings, workers: list[int]) -> None:
    p = ProxyProcess(settings, tmp_path)
    lt.run(p.ensure())
    assert p.pid is not None
    workers.append(p.pid)
    for op in ops.OPS:
        if op in (ops.RETIRE, ops.SHUTDOWN):
            continue
        try:
            lt.run(rpc.call(p.socket, op, {"slot": "x", "upstreams": [], "timeout": 0, "version": "v"}))
        except DaemonError as e:                     # an unknown op would be a DaemonError
            raise AssertionError(f"{op}: {e}") from None
        except Exception:
            pass                                     # refused arguments are fine: the op exists
    with pytest.raises(DaemonError):
        lt.run(rpc.call(p.socket, "inflight", {"slot": "blue"}))   # dead op, gone
    lt.run(p.shutdown())


def test_a_worker_of_another_version_is_replaced_without_a_gap(
        lt: LoopThread, tmp_path: Path, settings: ProxySettings, backends: tuple[Backend, Backend],
        workers: list[int]) -> None:
    routing = {"slots": {"blue": [list(backends[0].addr)], "green": [list(backends[1].addr)]},
               "versions": {"blue": "v7"}, "live": "green"}
    old = start_other(PROXY_PROTOCOL + 1, tmp_path, settings, routing)
    workers.append(old)
    assert get(settings.port)[2] == b"green"
    p = ProxyProcess(settings, tmp_path)
    assert lt.run(p.ensure()) == "started"          # not adopted: handed over
    assert p.pid is not None and p.pid != old
    workers.append(p.pid)
    info = lt.run(p.ping())
    assert info is not None and info["protocol"] == PROXY_PROTOCOL
    assert info["routing"]["live"] == "green"        # what the old worker served, nothing else
    assert info["routing"]["slots"] == routing["slots"]
    assert info["routing"]["versions"]["blue"] == "v7"
    assert get(settings.port)[2] == b"green"
    assert wait_gone(old)                            # the old worker retired
    lt.run(p.shutdown())


def test_a_worker_from_before_versioning_is_adopted_until_replaced(
        lt: LoopThread, tmp_path: Path, settings: ProxySettings, backends: tuple[Backend, Backend],
        workers: list[int]) -> None:
    """Its ops are this version's: the daemon may drive it, and replaces it (settings_differ makes
    the daemon's start hand over) once recovery knows the routing."""
    old = start_other(ops.UNVERSIONED, tmp_path, settings,
                      {"slots": {"blue": [list(backends[0].addr)]}, "versions": {}, "live": "blue"})
    workers.append(old)
    p = ProxyProcess(settings, tmp_path)
    assert lt.run(p.ensure()) == "adopted" and p.pid == old
    assert p.settings_differ
    lt.run(p.set_slot("green", [backends[1].addr]))          # what recovery does
    lt.run(p.switch("green"))
    assert get(settings.port)[2] == b"green"
    routing = {"slots": {"blue": [list(backends[0].addr)], "green": [list(backends[1].addr)]},
               "versions": {}, "live": "green"}

    async def configure(nxt: ProxyProcess) -> None:
        await nxt.set_slot("blue", [backends[0].addr])

    lt.run(p.handover(routing, configure))                    # what the daemon's reload does
    assert p.pid is not None and p.pid != old
    workers.append(p.pid)
    assert not p.settings_differ
    info = lt.run(p.ping())
    assert info is not None and info["protocol"] == PROXY_PROTOCOL
    assert wait_gone(old)
    assert get(settings.port)[2] == b"green"
    lt.run(p.shutdown())


def test_a_worker_of_another_version_that_hides_its_routing_is_refused_clearly(
        lt: LoopThread, tmp_path: Path, settings: ProxySettings, backends: tuple[Backend, Backend],
        workers: list[int]) -> None:
    routing = {"slots": {"blue": [list(backends[0].addr)]}, "versions": {}, "live": "blue"}
    old = start_other(PROXY_PROTOCOL + 5, tmp_path, settings, routing, bare=True)
    workers.append(old)
    p = ProxyProcess(settings, tmp_path)
    with pytest.raises(DaemonError) as info:
        lt.run(p.ensure())
    msg = str(info.value)
    assert f"protocol {PROXY_PROTOCOL + 5}" in msg and f"speaks {PROXY_PROTOCOL}" in msg
    assert f"kill {old}" in msg
    assert info.value.exit_code == 3
    assert get(settings.port)[2] == b"blue"          # left serving, untouched
    # given the routing (the daemon knows it), even such a worker is replaced without a gap
    assert lt.run(p.ensure(routing)) == "started"
    assert p.pid is not None
    workers.append(p.pid)
    assert wait_gone(old)
    assert get(settings.port)[2] == b"blue"
    lt.run(p.shutdown())


# -- start failures ---------------------------------------------------------------------------------
def test_an_address_that_cannot_be_bound_is_a_config_error(lt: LoopThread, tmp_path: Path) -> None:
    p = ProxyProcess(ProxySettings(listen="192.0.2.1:8000"), tmp_path)   # not an address of this host
    with pytest.raises(ConfigError) as info:
        lt.run(p.ensure())
    assert info.value.key == "proxy.listen" and info.value.exit_code == 2
    with pytest.raises(ConfigError) as info:       # the worker's own bind failure says the same
        lt.run(p._start(check_port=False))
    assert info.value.key == "proxy.listen"


def test_any_other_start_failure_is_a_daemon_error_with_the_log(lt: LoopThread, tmp_path: Path,
                                                                settings: ProxySettings) -> None:
    p = ProxyProcess(settings, tmp_path)
    (tmp_path / "proxy.sock").mkdir()             # the worker cannot bind its socket there
    (tmp_path / "proxy.sock" / "x").touch()
    with pytest.raises(DaemonError) as info:
        lt.run(p.ensure())
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "proxy.sock" in msg and "proxy.log" in msg   # the log's last lines
    assert not isinstance(info.value, ConfigError)


def test_a_bad_trusted_proxies_value_is_a_config_error(lt: LoopThread, tmp_path: Path) -> None:
    p = ProxyProcess(ProxySettings(listen=f"127.0.0.1:{free_port()}", trusted_proxies=("nope",)), tmp_path)
    with pytest.raises(ConfigError) as info:
        lt.run(p.ensure())
    assert info.value.key == "proxy.trusted_proxies"
    assert str(info.value).count("proxy.trusted_proxies") == 1 and "'nope'" in str(info.value)


# -- shutdown -----------------------------------------------------------------------------------------
def test_shutdown_waits_for_the_worker_and_removes_its_socket(lt: LoopThread, tmp_path: Path,
                                                              settings: ProxySettings, workers: list[int]) -> None:
    p = ProxyProcess(settings, tmp_path)
    lt.run(p.ensure())
    pid = p.pid
    assert pid is not None
    workers.append(pid)
    assert p.socket.exists()
    lt.run(p.shutdown())
    assert not alive(pid)                            # returned once the worker is gone
    assert not p.socket.exists()


def test_shutdown_after_the_worker_was_killed_removes_the_stale_socket(
        lt: LoopThread, tmp_path: Path, settings: ProxySettings, workers: list[int]) -> None:
    p = ProxyProcess(settings, tmp_path)
    lt.run(p.ensure())
    assert p.pid is not None
    workers.append(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    assert wait_gone(p.pid)
    assert p.socket.exists()                         # nobody cleaned up
    lt.run(p.shutdown())
    assert not p.socket.exists()


def test_config_errors_keep_file_and_key_across_the_socket(lt: LoopThread, tmp_path: Path) -> None:
    async def refuse(args: dict[str, Any], emit: rpc.Emit) -> None:
        raise ConfigError("expected host:port", file="/srv/changeover.toml", key="proxy.listen")

    async def go() -> None:
        server = await rpc.serve(tmp_path / "s.sock", {"x": refuse})
        try:
            await rpc.call(tmp_path / "s.sock", "x")
        finally:
            server.close()

    with pytest.raises(ConfigError) as info:
        lt.run(go())
    assert (info.value.file, info.value.key) == ("/srv/changeover.toml", "proxy.listen")
