"""Host routing benchmark: what routing by Host costs, side by side in one run on one backend.

    .venv/bin/python bench/front_bench.py [--duration 5] [--connections 50] [--rounds 1]

Paths, each with wrk sending `Host: shop.test` over keep-alive connections:
  direct               the backend (HAProxy answering `http-request return`)
  embedded             changeover's proxy, one project, no [proxy] hosts (the hot path unchanged)
  embedded + hosts     the same with hosts = ["shop.test", "*.shop.test"] (the Host looked up)
  shared front         the front with two attached projects, routing shop.test to one of them
  haproxy host acl     HAProxy routing by `hdr(host)` to two backends (what one would write by hand)
Each proxy is pinned to core 0, wrk and the backend to the last core (as bench/proxy_bench.py).
Besides req/s, the proxy process's CPU time per request is reported: other load on the machine
moves it far less than req/s.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import BACKEND_CFG, OTHER_CPU, PROXY_CPU, cpu_seconds, pinned, wait_port  # noqa: E402

from changeover.daemon.procs import free_port  # noqa: E402

PROXY = """
import asyncio, os, sys, tempfile, uvloop
from pathlib import Path
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.front import Front
from changeover.monitor.metrics import Recorder
mode, port, blue, green = sys.argv[1], *map(int, sys.argv[2:5])
async def main():
    settings = ProxySettings(listen=f"127.0.0.1:{port}")
    if mode == "front":
        tmp = Path(tempfile.mkdtemp())
        front = Front(tmp / "front.sock", tmp / "front.json", settings)
        await front.proxy.start()
        for name, hosts, up in (("shop", ["shop.test", "*.shop.test"], blue), ("blog", ["blog.test"], green)):
            (tmp / name).mkdir()
            await front.attach({"project": str(tmp / name), "hosts": hosts, "key": name * 32,
                                "initial": {"slots": {"blue": [["127.0.0.1", up]]}, "live": "blue"}}, os.getuid())
    else:
        hosts = ("shop.test", "*.shop.test") if mode == "hosts" else ()
        p = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{port}", hosts=hosts), Recorder())
        await p.start()
        p.set_slot("blue", [("127.0.0.1", blue)])
        p.switch("blue")
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

HAPROXY_HOSTS = """
global
    nbthread 1
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
    timeout http-keep-alive 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    use_backend shop if {{ hdr(host) -i shop.test }} || {{ hdr_end(host) -i .shop.test }}
    use_backend blog if {{ hdr(host) -i blog.test }}
backend shop
    http-reuse always
    server s1 127.0.0.1:{blue}
backend blog
    http-reuse always
    server b1 127.0.0.1:{green}
"""


def wrk(port: int, duration: float, conns: int, pid: int | None) -> dict[str, float]:
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(pinned(OTHER_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "-H", "Host: shop.test",
                                            f"http://127.0.0.1:{port}/"]),
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "errors": int(bad.group(1)) if bad else 0,
            "us_per_req": (cpu_seconds(pid) - cpu0) / max(n, 1) * 1e6 if pid else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1, help="repeat, keep each path's best")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="front-bench-"))
    blue, green = free_port(), free_port()
    (tmp / "backend.cfg").write_text(BACKEND_CFG.format(blue=blue, green=green))
    procs = [subprocess.Popen(pinned(OTHER_CPU, ["haproxy", "-q", "-f", str(tmp / "backend.cfg")]))]
    wait_port(blue)
    paths: dict[str, tuple[int, int | None]] = {"direct": (blue, None)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for name, mode in (("embedded", "plain"), ("embedded + hosts", "hosts"), ("shared front", "front")):
            port = free_port()
            p = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", PROXY, mode, str(port), str(blue),
                                                    str(green)]), stdout=subprocess.PIPE, text=True, env=env)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            procs.append(p)
            paths[name] = (port, p.pid)
        port = free_port()
        (tmp / "hosts.cfg").write_text(HAPROXY_HOSTS.format(port=port, blue=blue, green=green))
        h = subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-q", "-f", str(tmp / "hosts.cfg")]))
        procs.append(h)
        wait_port(port)
        paths["haproxy host acl"] = (port, h.pid)
        best: dict[str, dict[str, float]] = {}
        for _ in range(a.rounds):
            for name, (port, pid) in paths.items():
                r = wrk(port, a.duration, a.connections, pid)
                if name not in best or r["rps"] > best[name]["rps"]:
                    best[name] = r
                time.sleep(0.5)
        base = best["embedded"]["rps"]
        print(f"{'path':<18} {'req/s':>9} {'vs embedded':>12} {'CPU us/req':>11} {'errors':>7}")
        for name, r in best.items():
            cpu = f"{r['us_per_req']:.1f}" if r["us_per_req"] else "-"
            print(f"{name:<18} {r['rps']:>9.0f} {r['rps'] / base:>11.2f}x {cpu:>11} {int(r['errors']):>7}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(5)


if __name__ == "__main__":
    main()
