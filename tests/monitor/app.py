"""A real HTTP test app for the monitor's end-to-end tests: faults switch on at runtime."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass


@dataclass
class App:
    """Keep-alive HTTP/1.1 server on 127.0.0.1:0. Change `error_rate`/`delay` while it runs."""

    error_rate: float = 0.0
    delay: float = 0.0
    seed: int = 1
    server: asyncio.Server | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.conns: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> App:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.conns):   # a crashed app drops its keep-alive connections too
                w.close()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if self.delay:
                    await asyncio.sleep(self.delay)
                failed = self.rng.random() < self.error_rate
                body = b"boom\n" if failed else b"ok\n"
                status = b"500 Internal Server Error" if failed else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.conns.discard(writer)
            writer.close()


async def load(url: str, stop: asyncio.Event, concurrency: int = 4, pause: float = 0.0) -> list[int]:
    """Closed-loop clients hammering `url` until `stop`; returns the statuses seen (0: error)."""
    import httpx

    seen: list[int] = []

    async def worker(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                seen.append((await c.get(url)).status_code)
            except httpx.HTTPError:
                seen.append(0)
            if pause:
                await asyncio.sleep(pause)

    async with httpx.AsyncClient(timeout=5) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return seen
