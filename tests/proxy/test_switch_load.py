"""≥50 keep-alive clients while ≥20 switches happen: no failed request, and clients follow switches."""

from __future__ import annotations

import asyncio
import time

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, LoopThread


async def _client(port: int, stop: asyncio.Event, log: list[tuple[float, float, bytes]],
                  failures: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            sent = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError, IndexError) as e:
                failures.append(repr(e))
                return
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.decode())
            log.append((sent, time.monotonic(), body))
    finally:
        writer.close()


def test_switches_under_load(lt: LoopThread, proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    switches: list[tuple[float, float, bytes]] = []   # (started, done, new slot)

    async def run() -> tuple[list[tuple[float, float, bytes]], list[str]]:
        stop = asyncio.Event()
        log: list[tuple[float, float, bytes]] = []
        failures: list[str] = []
        tasks = [asyncio.create_task(_client(proxy.port, stop, log, failures)) for _ in range(50)]
        await asyncio.sleep(0.2)
        slot = "blue"
        for _ in range(24):
            slot = "green" if slot == "blue" else "blue"
            started = time.monotonic()
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_switch(proxy, slot), lt.loop))
            switches.append((started, time.monotonic(), slot.encode()))
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        return log, failures

    log, failures = asyncio.run(run())
    assert failures == []
    assert len(log) > 500
    # every request sent after a switch returned (and before the next began) hit the new slot
    checked = 0
    for i, (_, done, slot) in enumerate(switches):
        next_start = switches[i + 1][0] if i + 1 < len(switches) else float("inf")
        for sent, _, body in log:
            if done < sent < next_start:
                assert body == slot, f"request after switch {i} answered by {body!r}, not {slot!r}"
                checked += 1
    assert checked > 200
    assert lt.call(proxy.inflight, "blue") == 0 and lt.call(proxy.inflight, "green") == 0


async def _switch(proxy: EmbeddedProxy, slot: str) -> None:
    proxy.switch(slot)
