"""A small keep-alive HTTP load generator: what `make demo` and the tests put on the proxy.

N connections each send GET in a loop on one keep-alive connection and count answers by the
`X-Version` header, so a run shows which release answered and whether anything failed.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

RW = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def get(host: str, port: int, path: str = "/", conn: RW | None = None, timeout: float = 10,
              tls: _ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes, RW | None]:
    """One HTTP/1.1 GET on an existing or new connection: status, headers (lower-case), body, conn.
    With `tls`, a new connection is HTTPS (SNI: `host`). asyncio.timeout, not wait_for: on Python
    3.11 wait_for drops a cancel that lands as the read finishes, and a load loop then never ends."""
    if conn is None:
        async with asyncio.timeout(timeout):
            conn = await asyncio.open_connection(host, port, ssl=tls)
    reader, writer = conn
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    n = int(headers.get("content-length", "0"))
    body = b""
    if n:
        async with asyncio.timeout(timeout):
            body = await reader.readexactly(n)
    if headers.get("connection", "").lower() == "close":
        writer.close()
        return status, headers, body, None
    return status, headers, body, conn


@dataclass
class Load:
    port: int
    connections: int = 50
    path: str = "/"
    host: str = "127.0.0.1"
    pause: float = 0.0
    ok: int = 0
    failed: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    failed_versions: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    tls: _ssl.SSLContext | None = None    # HTTPS to the proxy's [proxy.tls] listener
    _stop: bool = False

    async def _conn(self) -> None:
        conn: RW | None = None
        while not self._stop:
            try:
                status, headers, _, conn = await get(self.host, self.port, self.path, conn, tls=self.tls)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError, _ssl.SSLError) as e:
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}")
                conn = None
                await asyncio.sleep(0.01)
                continue
            if status < 500:
                self.ok += 1
                self.versions[headers.get("x-version", "?")] += 1
            else:
                self.failed += 1
                self.failed_versions[headers.get("x-version", "proxy")] += 1
                self.errors.append(f"HTTP {status}")
            if self.pause:
                await asyncio.sleep(self.pause)
        if conn is not None:
            conn[1].close()

    async def run_until(self, done: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._conn()) for _ in range(self.connections)]
        await done.wait()
        self._stop = True
        await asyncio.gather(*tasks)

    def summary(self) -> dict[str, Any]:
        return {"served": self.ok, "failed": self.failed, "by_version": dict(self.versions),
                "failed_by_version": dict(self.failed_versions)}
