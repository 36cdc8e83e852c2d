"""`[proxy] workers = 2` under a real daemon: killed (SIGKILL, SIGTERM) while the switch step holds
(the proxy has switched, the state not yet), with one follower left on the old slot, as a failed
switch-back would leave it. The restarted daemon adopts the whole group, and recovery, which
follows the proxy, finds every worker on the leader's slot and the state following it."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from changeover import rpc, sockets
from changeover.proxy.remote import NEXT_SOCKET
from tests.daemon.harness import Project


def _versions(port: int, n: int) -> set[str]:
    """The X-Version of n requests, each on a new connection (spread over the workers)."""
    out = set()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
        out.add(next((ln.split(":", 1)[1].strip() for ln in head.split("\r\n") if ln.startswith("x-version:")), ""))
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_daemon_killed_mid_switch_every_worker_serves_one_slot_after_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    project = Project(tmp_path)
    project.write("workers = 2")
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "switch:2")
    project.start_daemon()
    try:
        project.deployed("v1")
        sock = sockets.place(tmp_path / ".changeover", "proxy.sock", room_for=NEXT_SOCKET)
        before = asyncio.run(rpc.call(sock, "ping"))
        assert len(before["pids"]) == 2
        old_slot = before["live"]
        proc = subprocess.Popen([sys.executable, "-m", "changeover", "deploy", "v2", "--path",
                                 str(project.release("v2")), "-c", str(project.config)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while asyncio.run(rpc.call(sock, "ping"))["live"] == old_slot:
            assert time.monotonic() < deadline, "the switch did not happen"
            time.sleep(0.05)
        step = project.running_step()
        assert step is not None and step.kind == "switch"        # the kill lands inside the step
        follower = tmp_path / ".changeover" / f"proxy.{before['pid']}.1.sock"
        asyncio.run(rpc.call(follower, "switch", {"slot": old_slot}))    # the workers now disagree
        project.kill_daemon(sig)
        proc.wait(30)
        monkeypatch.delenv("CHANGEOVER_TEST_STEP_DELAY")
        project.start_daemon()
        after = asyncio.run(rpc.call(sock, "ping"))
        assert after["pids"] == before["pids"], "the restarted daemon adopts every worker"
        assert len({w["live"] for w in after["workers"]}) == 1 and after["live"] != old_slot
        st = project.status()
        assert st["live"]["version"] == "v2"
        assert st["proxy"]["workers"] == after["pids"]          # status names every worker
        assert _versions(project.port, 30) == {"v2"}
    finally:
        project.teardown()
