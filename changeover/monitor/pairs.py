"""One paired probe: the same GET sent to an instance of each slot at the same moment.

Both connections are opened first, then both requests leave together (in random order: the one
written first would otherwise be a few microseconds "slower" every time, which a rank test over
many pairs notices) and each is timed from its own write to its response, so connection setup
and scheduling affect both alike.
Straight to the instances, not through the proxy: the proxy routes only to the live slot, and
these probes must not count as the live slot's traffic either.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from changeover.loadgen import RW, get

Address = tuple[str, int]


async def _timed(addr: Address, path: str, conn: RW, timeout: float) -> float | None:
    t0 = time.perf_counter()
    try:
        status, _, _, _ = await get(addr[0], addr[1], path, conn, timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
        return None
    return time.perf_counter() - t0 if status < 500 else None


async def paired_probe(new: Address, old: Address, path: str, timeout: float) -> tuple[float, float] | None:
    """(seconds for the new slot, seconds for the old one), or None when either failed: a failed
    probe is the error triggers' business, not a latency sample."""
    conns: list[RW] = []
    try:
        for host, port in (new, old):
            async with asyncio.timeout(timeout):
                conns.append(await asyncio.open_connection(host, port))
        first_new = random.random() < 0.5    # which one leaves first: no side always gains
        jobs = [_timed(new, path, conns[0], timeout), _timed(old, path, conns[1], timeout)]
        got = await asyncio.gather(*(jobs if first_new else jobs[::-1]))
        a, b = got if first_new else got[::-1]
    except (OSError, TimeoutError):
        return None
    finally:
        for _, w in conns:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
    return None if a is None or b is None else (a, b)
