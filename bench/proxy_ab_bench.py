"""The embedded proxy of this tree next to another checkout's, in one run, rounds interleaved.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/proxy_ab_bench.py /tmp/before [--rounds 5] [--duration 5] [--connections 50]

Same backend, same pinning and the same wrk as `bench/proxy_bench.py` (direct and HAProxy rows
for scale). Besides req/s it reports each proxy's CPU time per request (user + system from /proc
over the measured run): on a machine shared with other work, req/s swings by ±30 % between
rounds, CPU per request much less.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy_bench import (  # noqa: E402
    BACKEND_CFG,
    EMBEDDED,
    OTHER_CPU,
    PROXY_CFG,
    PROXY_CPU,
    pinned,
    wait_port,
    wrk,
)
from bench.slow_headers_bench import cpu_seconds  # noqa: E402
from changeover.daemon.procs import free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("other", type=Path, help="another changeover checkout")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="proxy-ab-"))
    blue, green, hport, this_port, other_port = (free_port() for _ in range(5))
    (tmp / "backend.cfg").write_text(BACKEND_CFG.format(blue=blue, green=green))
    (tmp / "proxy.cfg").write_text(PROXY_CFG.format(sock=tmp / "haproxy.sock", port=hport, blue=blue, green=green))
    procs = [subprocess.Popen(pinned(OTHER_CPU, ["haproxy", "-db", "-f", str(tmp / "backend.cfg")])),
             subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(tmp / "proxy.cfg")]))]
    try:
        for port, tree in ((this_port, ROOT), (other_port, args.other.resolve())):
            p = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(port), str(blue), str(green)]),
                                 stdout=subprocess.PIPE, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
            procs.append(p)
            assert p.stdout is not None
            p.stdout.readline()
        paths = {"direct": (blue, procs[0].pid), "haproxy": (hport, procs[1].pid),
                 "changeover (this tree)": (this_port, procs[2].pid),
                 f"changeover ({args.other})": (other_port, procs[3].pid)}
        for port, _ in paths.values():
            wait_port(port)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, (port, pid) in paths.items():
                wrk(port, 1, args.connections)                   # warm-up: pools, caches
                cpu0 = cpu_seconds(pid)
                r = wrk(port, args.duration, args.connections)
                r["us"] = (cpu_seconds(pid) - cpu0) / (r["rps"] * args.duration) * 1e6
                runs[name].append(r)
        print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s, {args.rounds} rounds interleaved")
        print("| path | best req/s | median req/s | p50 ms (best) | p99 ms (best) | errors | CPU µs/request (median) |")
        print("|---|---|---|---|---|---|---|")
        for name, rs in runs.items():
            best = max(rs, key=lambda r: r["rps"])
            med = sorted(r["rps"] for r in rs)[len(rs) // 2]
            us = sorted(r["us"] for r in rs)[len(rs) // 2]
            print(f"| {name} | {best['rps']:,.0f} | {med:,.0f} | {best['p50']:.2f} | {best['p99']:.2f} | "
                  f"{sum(r['errors'] for r in rs):.0f} | {us:.1f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
