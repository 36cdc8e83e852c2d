"""Several hosts, each a real daemon with the example app, in one fleet on a real etcd."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from changeover.config import locate
from changeover.daemon.procs import free_port
from tests.daemon.harness import Project

MONITOR_OFF = '\n[monitor]\nobserve = "0s"\nmetrics_listen = ""\n'


@dataclass
class Host(Project):
    name: str = "h"
    health_port: int = field(default_factory=free_port)
    listen_host: str = "127.0.0.1"
    wrap: list[str] = field(default_factory=list)    # run the daemon inside a network namespace

    def fleet_section(self, etcd: list[str], prefix: str, extra: str = "") -> str:
        return (f'\n[fleet]\netcd = {json.dumps(etcd)}\nname = "{self.name}"\nprefix = "{prefix}"\n'
                f'health_listen = "{self.listen_host}:{self.health_port}"\nhost_ttl = "2s"\nlock_ttl = "3s"\n'
                f'switch_timeout = "8s"\nprepare_timeout = "60s"\n{extra}')

    def spawn_daemon(self, env: dict[str, str] | None = None) -> None:
        log = open(self.root / "serve.out", "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen([*self.wrap, sys.executable, "-m", "changeover", "serve", "-c",
                                        str(self.config)], cwd=self.root, stdout=log, stderr=log,
                                       start_new_session=True, env={**os.environ, **(env or {})})
        log.close()

    def wait_daemon(self, timeout: float = 30) -> None:
        """Up when its control socket answers (read straight from the socket: no CLI start per poll)."""
        import asyncio

        from changeover import api, rpc

        sock = locate(self.config).socket_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                raise AssertionError("daemon exited:\n" + (self.root / "serve.out").read_text()[-3000:])
            if sock.exists():
                with contextlib.suppress(Exception):
                    asyncio.run(rpc.call(sock, "ping", {}, timeout=2, protocol=api.PROTOCOL))
                    return
            time.sleep(0.1)
        raise AssertionError("daemon did not come up:\n" + (self.root / "serve.out").read_text()[-3000:])

    def health(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(f"http://{self.listen_host}:{self.health_port}/_changeover/health", timeout=2)
        return r.status_code, r.json()

    def local_status(self) -> dict[str, Any]:
        """The daemon's own status, straight from its control socket (no CLI start per poll)."""
        import asyncio

        from changeover import api, rpc

        sock = locate(self.config).socket_path
        return dict(asyncio.run(rpc.call(sock, "status", {}, timeout=10, protocol=api.PROTOCOL)))

    def live_version(self) -> str | None:
        return (self.local_status().get("live") or {}).get("version")


class Fleet:
    def __init__(self, root: Path, etcd: list[str], prefix: str, n: int = 3, monitor: str = MONITOR_OFF,
                 fleet_extra: str = "") -> None:
        self.root, self.etcd, self.prefix = root, etcd, prefix
        self.hosts = [Host(root / f"h{i + 1}", name=f"h{i + 1}") for i in range(n)]
        for h in self.hosts:
            h.root.mkdir(parents=True)
            h.write(monitor + h.fleet_section(etcd, prefix, fleet_extra))
        self.monitor, self.fleet_extra = monitor, fleet_extra
        self.metrics_ports = {h.name: free_port() for h in self.hosts}

    def configure(self, monitor: str = 'observe = "0s"', fleet_extra: str = "", extra: str = "") -> None:
        """Every host's config anew (a daemon reads it for every deploy): its own /metrics port,
        `monitor` lines under [monitor], `fleet_extra` under [fleet], `extra` sections in front."""
        for h in self.hosts:
            h.write(f'{extra}\n[monitor]\nmetrics_listen = "127.0.0.1:{self.metrics_ports[h.name]}"\n{monitor}\n'
                    + h.fleet_section(self.etcd, self.prefix, fleet_extra))

    def start(self) -> None:
        """Every daemon at once (one by one costs a CLI start per poll per host)."""
        for h in self.hosts:
            h.spawn_daemon()
        for h in self.hosts:
            h.wait_daemon()
        self.wait(lambda: len(self.status()["hosts"]) == len(self.hosts), "every host registered")

    def releases(self, version: str) -> str:
        """The release directory on every host, named relative to each host's root."""
        for h in self.hosts:
            h.release(version)
        return f"releases/{version}"

    def cli(self, *args: str, host: int = 0, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return self.hosts[host].cli(*args, check=check, timeout=timeout)

    def spawn(self, *args: str, host: int = 0, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        h = self.hosts[host]
        return subprocess.Popen([sys.executable, "-m", "changeover", *args, "-c", str(h.config)], cwd=h.root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, **(env or {})})

    def deploy(self, version: str, *extra: str, check: bool = True, host: int = 0
               ) -> subprocess.CompletedProcess[str]:
        return self.cli("deploy", version, "--path", self.releases(version), *extra, check=check, host=host)

    def status(self) -> dict[str, Any]:
        """The fleet as `status --json` shows it ("fleet", "hosts"), read from etcd in this process."""
        from changeover.fleet.config import peek
        from changeover.fleet.coordinator import Coordinator, run

        cfg = peek(self.hosts[0].config)
        assert cfg is not None

        async def read(c: Coordinator) -> dict[str, Any]:
            return await c.status()

        return dict(run(cfg, None, read))

    def history(self, limit: int = 10) -> list[dict[str, Any]]:
        """The fleet's deployments as `history --json` lists them, newest first (read in this process)."""
        from changeover.fleet.config import peek
        from changeover.fleet.coordinator import Coordinator, run

        cfg = peek(self.hosts[0].config)
        assert cfg is not None

        async def read(c: Coordinator) -> list[dict[str, Any]]:
            return await c.history(limit)

        return list(run(cfg, None, read))

    def cli_status(self, host: int = 0) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json", host=host).stdout))

    def lives(self) -> list[str | None]:
        return [h.live_version() for h in self.hosts]

    @staticmethod
    def wait(cond: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if cond():
                    return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {what}")

    def teardown(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def down(h: Host) -> None:
            with contextlib.suppress(Exception):
                h.teardown()

        with ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(down, self.hosts))
