"""A real three-member etcd cluster for the fleet tests: Debian's `etcd` binary, each member on
free loopback ports (or the addresses given) with its own data directory in /dev/shm (tmpfs, so
its fsyncs cost nothing on a shared machine), killed and removed at the end."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from changeover.daemon.procs import free_port

ETCD = shutil.which("etcd")


@dataclass
class Member:
    name: str
    client: int
    peer: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client}"


@dataclass
class Cluster:
    members: list[Member] = field(default_factory=list)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="co-etcd-", dir="/dev/shm")))
    wrap: list[str] = field(default_factory=list)     # e.g. ["ip", "netns", "exec", "co-core"]
    listen: str = "127.0.0.1"

    @classmethod
    def make(cls, n: int = 3, host: str = "127.0.0.1", wrap: list[str] | None = None,
             listen: str = "127.0.0.1") -> Cluster:
        c = cls(wrap=wrap or [], listen=listen)
        # free_port() releases the port it found, so it may find the same one again: all 2n distinct
        taken: set[int] = set()
        for i in range(n):
            client = free_port(taken)
            taken.add(client)
            peer = free_port(taken)
            taken.add(peer)
            c.members.append(Member(f"m{i}", client, peer, host))
        return c

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> None:
        initial = ",".join(f"{m.name}=http://{m.host}:{m.peer}" for m in self.members)
        for m in self.members:
            self._spawn(m, initial)
        self.wait_healthy()

    def _spawn(self, m: Member, initial: str) -> None:
        assert ETCD is not None
        log = open(self.root / f"{m.name}.log", "ab")  # noqa: SIM115
        m.proc = subprocess.Popen([*self.wrap, ETCD, "--name", m.name, "--data-dir", str(self.root / m.name),
                                   "--listen-client-urls", f"http://{self.listen}:{m.client}",
                                   "--advertise-client-urls", m.url,
                                   "--listen-peer-urls", f"http://{self.listen}:{m.peer}",
                                   "--initial-advertise-peer-urls", f"http://{m.host}:{m.peer}",
                                   "--initial-cluster", initial, "--initial-cluster-state", "new",
                                   "--initial-cluster-token", self.root.name,
                                   "--heartbeat-interval", "50", "--election-timeout", "500",
                                   "--logger", "zap", "--log-level", "warn"],
                                  stdout=log, stderr=log, start_new_session=True)
        log.close()

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.wrap:   # inside a namespace: ask through etcdctl-free curl there
                ok = all(subprocess.run([*self.wrap, "curl", "-sf", "-m", "1", f"{m.url}/health"],
                                        capture_output=True).returncode == 0 for m in self.members if m.proc)
            else:
                ok = True
                for m in self.members:
                    if m.proc is None:
                        continue
                    try:
                        r = httpx.get(f"{m.url}/health", timeout=1)
                        ok = ok and r.status_code == 200 and r.json().get("health") == "true"
                    except httpx.HTTPError:
                        ok = False
            if ok:
                return
            time.sleep(0.1)
        raise AssertionError("etcd did not become healthy:\n" + "\n".join(
            (self.root / f"{m.name}.log").read_text()[-2000:] for m in self.members))

    def kill(self, i: int) -> None:
        m = self.members[i]
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=10)
        m.proc = None

    def restart(self, i: int) -> None:
        """Start a killed member again on its data directory (it rejoins the cluster)."""
        m = self.members[i]
        if m.proc is None:
            self._spawn(m, ",".join(f"{x.name}=http://{x.host}:{x.peer}" for x in self.members))

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=10)
            m.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
