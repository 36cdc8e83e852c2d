"""A real HTTP test app for the monitor's end-to-end tests: faults switch on at runtime."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field


class SharedDb:
    """What both slots' apps use alike, like a database: `size` connections, each request holds
    one for `hold` seconds. Under load, requests of both slots queue for it."""

    def __init__(self, size: int = 4, hold: float = 0.004) -> None:
        self.sem = asyncio.Semaphore(size)
        self.hold = hold

    async def query(self) -> None:
        async with self.sem:
            await asyncio.sleep(self.hold)


@dataclass
class App:
    """Keep-alive HTTP/1.1 server on 127.0.0.1:0. Change `error_rate`/`delay` while it runs."""

    error_rate: float = 0.0
    delay: float = 0.0
    seed: int = 1
    server: asyncio.Server | None = None
    faults: dict[str, tuple[float, float]] = field(default_factory=dict)  # path -> (error rate, delay)
    db: SharedDb | None = None

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
                path = head.split(b" ", 2)[1].split(b"?", 1)[0].decode()
                error_rate, delay = self.faults.get(path, (self.error_rate, self.delay))
                if self.db is not None:
                    await self.db.query()
                if delay:
                    await asyncio.sleep(delay)
                failed = self.rng.random() < error_rate
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


async def load(url: str, stop: asyncio.Event, concurrency: int = 4, pause: float | Callable[[], float] = 0.0,
               paths: dict[str, float] | None = None, active: Callable[[], int] | None = None,
               seed: int = 1) -> list[int]:
    """Closed-loop clients hammering `url` until `stop`; returns the statuses seen (0: error).
    `paths`: path -> share of requests (default: `url` alone); `active()`: how many of the
    clients work right now (the others wait); `pause` (seconds, or a function giving them) between
    a client's requests: both to ramp load up or down."""
    import httpx

    seen: list[int] = []
    rng = random.Random(seed)
    choices, weights = (list(paths), list(paths.values())) if paths else ([""], [1.0])

    async def worker(c: httpx.AsyncClient, k: int) -> None:
        while not stop.is_set():
            if active is not None and k >= active():
                await asyncio.sleep(0.01)
                continue
            path = rng.choices(choices, weights)[0]
            try:
                seen.append((await c.get(url.rstrip("/") + path if path else url)).status_code)
            except httpx.HTTPError:
                seen.append(0)
            p = pause() if callable(pause) else pause
            if p:
                await asyncio.sleep(p)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=5, limits=limits) as c:
        await asyncio.gather(*(worker(c, k) for k in range(concurrency)))
    return seen
