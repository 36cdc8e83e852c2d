"""The load balancer in front of the fleet (a real HAProxy, health-checking each host's
`/_changeover/health`) and a keep-alive load that records every response's version and time."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from changeover.daemon.procs import free_port
from changeover.loadgen import RW, get

HAPROXY = shutil.which("haproxy")


def haproxy_config(port: int, servers: list[tuple[str, str, int, int]], bind: str = "127.0.0.1") -> str:
    """servers: (name, address, proxy port, health port). The same shape as docs/fleet.md."""
    lines = [f"    server {n} {addr}:{p} check port {hp}" for n, addr, p, hp in servers]
    return f"""global
    maxconn 4096

defaults
    mode http
    timeout connect 500ms
    timeout client 30s
    timeout server 5s
    retries 3
    retry-on conn-failure empty-response response-timeout
    option redispatch 1

frontend fleet
    bind {bind}:{port}
    default_backend hosts

backend hosts
    balance roundrobin
    option httpchk GET /_changeover/health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
""" + "\n".join(lines) + "\n"


@dataclass
class Front:
    root: Path
    servers: list[tuple[str, str, int, int]]
    port: int = field(default_factory=free_port)
    bind: str = "127.0.0.1"
    wrap: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert HAPROXY is not None
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.port, self.servers, self.bind))
        log = open(self.root / "haproxy.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*self.wrap, HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class Recorded:
    sent: float
    status: int          # 0: no answer (connection error)
    version: str


class Recorder:
    """Keep-alive GETs through the front on a few connections, in a thread of its own."""

    def __init__(self, host: str, port: int, connections: int = 4, pause: float = 0.005) -> None:
        self.host, self.port, self.connections, self.pause = host, port, connections, pause
        self.records: list[Recorded] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _conn(self) -> None:
        conn: RW | None = None
        while not self._stop.is_set():
            sent = time.time()
            try:
                status, headers, _, conn = await get(self.host, self.port, "/", conn, timeout=5)
                self.records.append(Recorded(sent, status, headers.get("x-version", "?")))
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                self.records.append(Recorded(sent, 0, "error"))
                conn = None
            await asyncio.sleep(self.pause)
        if conn is not None:
            conn[1].close()

    async def _run(self) -> None:
        await asyncio.gather(*(self._conn() for _ in range(self.connections)))

    def since(self, t: float) -> list[Recorded]:
        return [r for r in list(self.records) if r.sent >= t]

    def failed(self, t: float = 0.0, but: tuple[str, ...] = ()) -> list[Recorded]:
        """Requests that failed (no answer, or 5xx), apart from those of releases in `but` (a
        release's own injected errors)."""
        return [r for r in self.since(t) if (r.status == 0 or r.status >= 500) and r.version not in but]

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.records)
        while len(self.records) - start < n and time.monotonic() < deadline:
            time.sleep(0.05)
