"""The load balancer's health check of a fleet host: `GET /_changeover/health`.

200 when the host serves the release the fleet wants, 503 while it is out of sync (cut off from
etcd, or lagging behind the desired state), so HAProxy, nginx or a cloud load balancer takes a
lagging host out and puts it back once it has converged. The body says why, as JSON.

It is served by the daemon on `[fleet] health_listen` (by default the proxy's port + 1), a
listener of its own: it answers from what the daemon knows and never reaches the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("changeover.fleet")
READ_TIMEOUT = 5.0


class HealthServer:
    def __init__(self, host: str, port: int, path: str, judge: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        self.host, self.port, self.path = host, port, path
        self.judge = judge
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port, reuse_address=True)
        log.info("fleet health check on http://%s:%d%s", self.host, self.port, self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            method, target = (parts[0], parts[1].decode("latin-1")) if len(parts) >= 2 else (b"", "")
            if target.split("?", 1)[0] != self.path or method not in (b"GET", b"HEAD"):
                status, body = 404, {"error": f"not found; the health check is GET {self.path}"}
            else:
                ok, body = self.judge()
                status = 200 if ok else 503
            data = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
                         .encode() + (data if method != b"HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
