"""HTTPS load from a thread of its own: keep-alive clients and clients that open a new TLS
connection per request (so certificate swaps are seen); every failure is recorded."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field

from cryptography import x509


@dataclass
class HttpsLoad:
    port: int
    ctx: ssl.SSLContext
    name: str = "shop.test"
    keepalive: int = 8
    fresh: int = 4
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    bodies: Counter[bytes] = field(default_factory=Counter)
    serials: Counter[int] = field(default_factory=Counter)    # certificates seen by new handshakes
    reconnects: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"GET / HTTP/1.1\r\nHost: {self.name}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        low = head.lower()
        length = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            self.failures.append(head.decode(errors="replace").splitlines()[0])
        else:
            self.ok += 1
            self.bodies[body] += 1
        return b"connection: close" not in low

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ctx, server_hostname=self.name), 10)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.serials[x509.load_der_x509_certificate(der).serial_number] += 1
        return reader, writer

    async def _client(self, keep: bool) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = await self._open()
                again = await self._one(*conn)
                if not again or not keep:
                    conn[1].close()
                    conn = None
                    self.reconnects += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError, IndexError, ValueError) as e:
                self.failures.append(repr(e))
                conn = None
                await asyncio.sleep(0.01)
        if conn is not None:
            conn[1].close()

    async def _main(self) -> None:
        await asyncio.gather(*[self._client(True) for _ in range(self.keepalive)],
                             *[self._client(False) for _ in range(self.fresh)])

    def __enter__(self) -> HttpsLoad:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def wait_for(self, n: int, timeout: float = 20) -> None:
        """Until `n` more requests have succeeded."""
        import time

        target, deadline = self.ok + n, time.monotonic() + timeout
        while self.ok < target and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(0.01)
        assert self.ok >= target, f"load stalled at {self.ok} (failures: {self.failures[:5]})"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(20)
