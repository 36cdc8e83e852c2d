"""Hosts as network namespaces: a `core` namespace holds the three etcd members and the HAProxy
front; each host is a namespace of its own with a daemon and the example app, joined to the core
by a veth pair (10.77.N.1 on the core side, 10.77.N.2 on the host's). Cutting a host off is
`ip link set ... down` on its pair. The front listens on a unix socket too (filesystem sockets
cross namespaces), so the load runs from the test process. Everything is removed at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover.loadgen import RW, get
from tests.fleet.cluster import ETCD, Cluster
from tests.fleet.front import HAPROXY, Recorded
from tests.fleet.harness import MONITOR_OFF, Fleet

IP = shutil.which("ip")


def _ip(*args: str) -> None:
    assert IP is not None
    subprocess.run([IP, *args], check=True, capture_output=True)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if IP is None:
        return "the `ip` command (iproute2) is missing"
    if ETCD is None:
        return "etcd is not installed (Debian: etcd-server)"
    if HAPROXY is None:
        return "haproxy is not installed"
    probe = f"cofprobe{uuid.uuid4().hex[:4]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` is not permitted here: {e.stderr.decode().strip()}"
    _ip("netns", "del", probe)
    return None


class Net:
    def __init__(self, n: int = 3) -> None:
        tag = uuid.uuid4().hex[:4]
        self.core = f"cof{tag}core"
        self.hosts = [f"cof{tag}h{i + 1}" for i in range(n)]
        self.links = [f"cf{tag}c{i + 1}" for i in range(n)]
        self.made: list[str] = []

    def exec(self, ns: str) -> list[str]:
        return [str(IP), "netns", "exec", ns]

    def up(self) -> None:
        for ns in (self.core, *self.hosts):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, (ns, link) in enumerate(zip(self.hosts, self.links, strict=True), 1):
            _ip("link", "add", link, "netns", self.core, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.core, "addr", "add", f"10.77.{i}.1/24", "dev", link)
            _ip("-n", self.core, "link", "set", link, "up")
            _ip("-n", ns, "addr", "add", f"10.77.{i}.2/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def cut(self, i: int, down: bool = True) -> None:
        _ip("-n", self.core, "link", "set", self.links[i], "down" if down else "up")

    def down(self) -> None:
        for ns in reversed(self.made):   # deleting a namespace deletes its veth ends
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "pids", ns)
            out = subprocess.run([str(IP), "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in out:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)


class UnixRecorder:
    """Keep-alive GETs through the front's unix socket, every response's version and time."""

    def __init__(self, path: Path, connections: int = 4) -> None:
        self.path, self.connections = path, connections
        self.records: list[Recorded] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> UnixRecorder:
        self._front_serves()
        self._thread.start()
        return self

    def _front_serves(self, timeout: float = 30) -> None:
        """The front starts with every host marked up, takes them out while nothing is live and
        puts them back `rise` checks after the first deploy: record only once it serves."""
        async def one() -> int:
            conn = await asyncio.open_unix_connection(str(self.path))
            try:
                status, *_ = await get("front", 80, "/", conn, timeout=5)
                return status
            finally:
                conn[1].close()

        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                if asyncio.run(one()) == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the front at {self.path} did not serve 200 within {timeout} s")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _conn(self) -> None:
        conn: RW | None = None
        while not self._stop.is_set():
            sent = time.time()
            try:
                if conn is None:
                    conn = await asyncio.open_unix_connection(str(self.path))
                status, headers, _, conn = await get("front", 80, "/", conn, timeout=5)
                self.records.append(Recorded(sent, status, headers.get("x-version", "?")))
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                self.records.append(Recorded(sent, 0, "error"))
                conn = None
            await asyncio.sleep(0.005)

    async def _run(self) -> None:
        await asyncio.gather(*(self._conn() for _ in range(self.connections)))

    def since(self, t: float) -> list[Recorded]:
        return [r for r in list(self.records) if r.sent >= t]


@pytest.fixture
def netfleet(tmp_path: Path) -> Iterator[tuple[Net, Cluster, Fleet, Path]]:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    net = Net()
    cluster: Cluster | None = None
    fleet: Fleet | None = None
    front: subprocess.Popen[bytes] | None = None
    try:
        net.up()
        cluster = Cluster.make(3, host="127.0.0.1", wrap=net.exec(net.core), listen="0.0.0.0")
        cluster.start()
        ports = [m.client for m in cluster.members]
        fleet = Fleet.__new__(Fleet)
        fleet.root, fleet.prefix, fleet.monitor, fleet.fleet_extra = tmp_path, "net", MONITOR_OFF, ""
        fleet.etcd = []
        from tests.fleet.harness import Host

        fleet.hosts = []
        for i, ns in enumerate(net.hosts, 1):
            h = Host(tmp_path / f"h{i}", name=f"h{i}", listen_host=f"10.77.{i}.2", wrap=net.exec(ns))
            h.root.mkdir()
            etcd = [f"http://10.77.{i}.1:{p}" for p in ports]
            h.write(MONITOR_OFF + h.fleet_section(etcd, "net"))
            text = h.config.read_text().replace(f'listen = "127.0.0.1:{h.port}"', f'listen = "10.77.{i}.2:{h.port}"')
            h.config.write_text(text)
            fleet.hosts.append(h)
        # The coordinator and every fleet CLI call run in the core namespace (where etcd is).
        op = tmp_path / "operator"
        op.mkdir()
        core_cfg = fleet.hosts[0].config.read_text().replace("10.77.1.1", "127.0.0.1")
        (op / "changeover.toml").write_text(core_cfg)
        for h in fleet.hosts:
            h.spawn_daemon()
        for h in fleet.hosts:
            h.wait_daemon()
        sock = tmp_path / "front.sock"
        servers = "\n".join(f"    server {h.name} 10.77.{i}.2:{h.port} check port {h.health_port}"
                            for i, h in enumerate(fleet.hosts, 1))
        (tmp_path / "haproxy.cfg").write_text(f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 300ms
    timeout client 30s
    timeout server 2s
    retries 3
    retry-on conn-failure empty-response response-timeout
    option redispatch 1
frontend fleet
    bind unix@{sock} mode 666
    default_backend hosts
backend hosts
    balance roundrobin
    option httpchk GET /_changeover/health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
{servers}
""")
        log = open(tmp_path / "haproxy.log", "ab")  # noqa: SIM115
        front = subprocess.Popen([*net.exec(net.core), str(HAPROXY), "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                 stdout=log, stderr=log, start_new_session=True)
        log.close()
        yield net, cluster, fleet, op
    finally:
        if front is not None:
            front.kill()
            front.wait(timeout=10)
        if fleet is not None:
            for i in range(len(net.hosts)):
                with contextlib.suppress(Exception):
                    net.cut(i, down=False)
            fleet.teardown()
        if cluster is not None:
            cluster.stop()
        net.down()


def core_cli(net: Net, op: Path, *args: str, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*net.exec(net.core), sys.executable, "-m", "changeover", *args, "-c",
                        str(op / "changeover.toml")], cwd=op, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"changeover {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def status(net: Net, op: Path) -> dict[str, Any]:
    return dict(json.loads(core_cli(net, op, "status", "--json").stdout))


def releases(fleet: Fleet, op: Path, version: str) -> str:
    for h in fleet.hosts:
        h.release(version)
    (op / "releases" / version).mkdir(parents=True, exist_ok=True)
    return f"releases/{version}"


def test_a_host_cut_off_before_the_barrier_aborts_after_the_switch_it_converges(
        netfleet: tuple[Net, Cluster, Fleet, Path]) -> None:
    net, _, fleet, op = netfleet
    Fleet.wait(lambda: len(status(net, op)["hosts"]) == 3, "three hosts registered")
    core_cli(net, op, "deploy", "v1", "--path", releases(fleet, op, "v1"))
    sock = fleet.root / "front.sock"
    with UnixRecorder(sock) as load:
        Fleet.wait(lambda: len(load.records) > 100, "traffic through the front")

        # Before the barrier: h3 is cut off while the hosts prepare v2 -> aborted everywhere. Each
        # instance takes 12 s to start, so a test slowed by a loaded machine still cuts h3 before
        # its prepare ends (the abort stops the others' starts: the test does not wait them out).
        path = releases(fleet, op, "v2")
        bg = subprocess.Popen([*net.exec(net.core), sys.executable, "-m", "changeover", "deploy", "v2", "--path",
                               path, "--env", "FAULT_START_DELAY=12", "-c", str(op / "changeover.toml")], cwd=op,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        Fleet.wait(lambda: (status(net, op)["hosts"]["h3"].get("deployment") or {}).get("version") == "v2",
                   "h3 prepares v2")
        net.cut(2)
        _, err = bg.communicate(timeout=120)
        assert bg.returncode == 1 and "aborted before the switch" in err and "h3" in err, err
        net.cut(2, down=False)
        Fleet.wait(lambda: all(h["in_sync"] and h.get("deployment") is None and h["live"]["version"] == "v1"
                               for h in status(net, op)["hosts"].values()), "h3 back, aborted, in sync", 60)

        # After the switch: prepared everywhere, h3 cut off, the switch goes on without it.
        core_cli(net, op, "deploy", "v3", "--path", releases(fleet, op, "v3"), "--no-switch")
        net.cut(2)
        Fleet.wait(lambda: "h3" not in status(net, op)["hosts"] or not status(net, op)["hosts"]["h3"]["reachable"],
                   "h3 gone from etcd")
        sw = core_cli(net, op, "switch")
        t_switched = time.time()
        assert "v3 is live on 2 host(s)" in sw.stderr, sw.stderr
        net.cut(2, down=False)
        Fleet.wait(lambda: all(h["in_sync"] and h["live"]["version"] == "v3"
                               for h in status(net, op)["hosts"].values()), "h3 converges to v3", 60)
        t_converged = time.time()
        Fleet.wait(lambda: len(load.since(t_converged)) > 200, "traffic after h3 is back")
    after = load.since(t_switched + 0.5)
    assert after and {r.version for r in after} == {"v3"}, "no host served the old release after the switch"
    failed = [r for r in load.records if r.status == 0 or r.status >= 500]
    assert failed == [], failed[:5]
