"""Slow-header (slowloris) cost: CPU a proxy spends on clients that drip their request heads.

    .venv/bin/python bench/slow_headers_bench.py [--connections 100] [--seconds 7] [--before DIR]

For each head size (14 KB, 60 KB), `--connections` clients each send an unfinished head of that
size at once, then one more byte every 10 ms for `--seconds`. Measured: the proxy process's CPU
time (user + system, from /proc) over the dripping phase, and the p50 latency of ordinary
requests sent meanwhile on one keep-alive connection. Proxies: changeover's embedded proxy (this
tree, and with `--before DIR` another checkout of changeover, e.g. a `git worktree` of an older
commit) and HAProxy (nbthread 1; tune.bufsize raised so that a 60 KB head fits). Each proxy is
pinned to core 0, the clients and the backend to the last core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy_bench import BACKEND_CFG, OTHER_CPU, PROXY_CPU, cpu_seconds, pinned, wait_port  # noqa: E402
from changeover.daemon.procs import free_port  # noqa: E402

HAPROXY_CFG = """
global
    nbthread 1
    tune.bufsize {bufsize}
defaults
    mode http
    timeout client 60s
    timeout server 60s
    timeout connect 5s
    timeout http-request 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server blue 127.0.0.1:{blue}
"""

EMBEDDED = """
import asyncio, sys, uvloop
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.monitor.metrics import Recorder
port, blue = map(int, sys.argv[1:3])
async def main():
    p = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{port}", header_timeout=60, idle_timeout=60), Recorder())
    await p.start()
    p.set_slot("blue", [("127.0.0.1", blue)])
    p.switch("blue")
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def drip(port: int, head_bytes: int, seconds: float, stop: asyncio.Event) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Pad: " + b"a" * (head_bytes - 40))
    await writer.drain()
    sent = 0
    while not stop.is_set():
        await asyncio.sleep(0.01)
        if writer.is_closing() or reader.at_eof():
            break
        writer.write(b"a")
        sent += 1
    writer.close()
    return sent


async def probe(port: int, stop: asyncio.Event) -> list[float]:
    """Ordinary requests, one at a time on a keep-alive connection: their latency in ms."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.005)
    writer.close()
    return out


async def run_load(port: int, pid: int, conns: int, head_bytes: int, seconds: float) -> dict[str, float]:
    stop = asyncio.Event()
    drippers = [asyncio.ensure_future(drip(port, head_bytes, seconds, stop)) for _ in range(conns)]
    await asyncio.sleep(1.0)                      # every head sent, dripping under way
    prober = asyncio.ensure_future(probe(port, stop))
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
    stop.set()
    lat = await prober
    sent = await asyncio.gather(*drippers, return_exceptions=True)
    alive = sum(1 for s in sent if isinstance(s, int) and s > seconds * 50)
    return {"cpu": cpu, "wall": wall, "p50": statistics.median(lat) if lat else float("nan"), "alive": alive}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=7)
    ap.add_argument("--before", type=Path, help="another changeover checkout to measure side by side")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slow-headers-"))
    blue = free_port()
    (tmp / "backend.cfg").write_text(BACKEND_CFG.format(blue=blue, green=free_port()))
    backend = subprocess.Popen(pinned(OTHER_CPU, ["haproxy", "-db", "-f", str(tmp / "backend.cfg")]))
    os.sched_setaffinity(0, {int(OTHER_CPU)})
    rows: list[tuple[str, int, dict[str, float]]] = []
    try:
        wait_port(blue)
        proxies: list[tuple[str, list[str], Path | None]] = [("changeover", [], ROOT)]
        if args.before:
            proxies.append(("changeover (before)", [], args.before.resolve()))
        proxies.append(("haproxy", [], None))
        for head_kb in (14, 60):
            for name, _, tree in proxies:
                port = free_port()
                if tree is None:
                    cfg = tmp / "proxy.cfg"
                    cfg.write_text(HAPROXY_CFG.format(port=port, blue=blue, bufsize=81920))
                    proc = subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(cfg)]))
                else:
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    proc = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(port), str(blue)]),
                                            stdout=subprocess.PIPE, cwd=tree, env=env)
                    assert proc.stdout is not None
                    proc.stdout.readline()
                try:
                    wait_port(port)
                    r = asyncio.run(run_load(port, proc.pid, args.connections, head_kb * 1024, args.seconds))
                    rows.append((name, head_kb, r))
                finally:
                    proc.terminate()
                    proc.wait(5)
        print(f"\n{args.connections} connections dripping 1 byte / 10 ms into an unfinished head, "
              f"{args.seconds:g} s measured")
        print("| proxy | head | CPU s | CPU / wall | p50 of other requests, ms | drippers still connected |")
        print("|---|---|---|---|---|---|")
        for name, kb, r in rows:
            print(f"| {name} | {kb} KB | {r['cpu']:.2f} | {r['cpu'] / r['wall']:.0%} | {r['p50']:.2f} | "
                  f"{r['alive']:.0f} |")
    finally:
        backend.terminate()
        backend.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
