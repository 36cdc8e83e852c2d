"""Proxy scale benchmark: changeover's embedded proxy next to HAProxy at high concurrency, and bulk.

    flock /tmp/team/bench.lock .venv/bin/python bench/proxy_scale_bench.py \
        [--tree DIR] [--conns 50,1000,5000] [--duration 10] [--bulk-mb 500] [--workers 1,2] [--somaxconn N]
        [--rounds N] [--only direct,changeover,haproxy] [--before DIR]

Backend: nginx (`return 200`, one worker process, keep-alive without a request limit; a 500 MB
file from /dev/shm for bulk), else HAProxy `http-request return`. Each proxy runs on core 0 (one
worker, HAProxy `nbthread 1`); nginx and wrk share the last core. `--tree` runs the embedded proxy
from another checkout (e.g. a `git worktree` of an older commit, for before/after figures);
`--before DIR` runs a second one from DIR on the same core, taking turns with the others in every
round (row "before"), so that before and after see the same machine.
`--workers` also runs the real proxy worker (`changeover.proxy.worker`) with `[proxy] workers`
= each N, worker i pinned to core i, wrk and nginx unpinned (the machine has no spare core then).
Every figure comes from one run, side by side; the fd limit is raised for -c5000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from changeover.daemon.procs import free_port  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from proxy_bench import cpu_split, pinned, stop, wait_port  # noqa: E402

CPUS = os.cpu_count() or 1
PROXY_CPU = "0"
OTHER_CPU = str(CPUS - 1)

NGINX_CFG = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
worker_rlimit_nofile 19000;
events {{ worker_connections 18000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=65535;
        location = /bulk {{ alias {tmp}/bulk.bin; }}
        location / {{ default_type text/plain; return 200 "ok"; }}
    }}
}}
"""

HAPROXY_BACKEND = """
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout client 300s
    timeout server 300s
    timeout connect 5s
frontend be
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok
"""

HAPROXY_PROXY = """
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    maxconn 9000
    timeout client 300s
    timeout server 300s
    timeout connect 5s
    timeout http-keep-alive 300s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server blue 127.0.0.1:{backend}
"""

EMBEDDED = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3])
import uvloop
from changeover.monitor.metrics import Recorder
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
port, backend = int(sys.argv[1]), int(sys.argv[2])

async def main():
    # as in production (changeover/proxy/worker.py): every request is recorded for the monitor
    p = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{port}"), Recorder())
    await p.start()
    p.set_slot("blue", [("127.0.0.1", backend)])
    p.switch("blue")
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def _ms(v: str, unit: str) -> float:
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


THREADS = 0     # wrk threads; 0: one, two from 2000 connections (--threads)


def wrk(port: int, duration: float, conns: int, cpu: str | None = OTHER_CPU,
        pid: int | None = None) -> dict[str, float]:
    """wrk's figures; with `pid`, also that process's CPU time per request, which other load on a
    shared machine moves far less than req/s (it is the proxy's own cost)."""
    threads = THREADS or (1 if conns < 2000 else 2)
    cpu0 = cpu_split(pid) if pid else (0.0, 0.0)
    out = subprocess.run(
        pinned(cpu, ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s", "--latency",
                     f"http://127.0.0.1:{port}/"]),
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {p: _ms(*re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s|m)\b", out).groups())  # type: ignore[union-attr]
           for p in ("50", "99")}
    mx = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)\b", out)
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu1 = cpu_split(pid) if pid else (0.0, 0.0)
    user, system = ((cpu1[k] - cpu0[k]) / max(n, 1) * 1e6 for k in (0, 1))
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "max": _ms(*mx.groups()) if mx else -1.0,
            "errors": errors, "us": user + system, "user": user, "sys": system}


def bulk(port: int, size: int, rounds: int = 3) -> float:
    """Best MB/s of `rounds` downloads of the bulk response (curl, to /dev/null)."""
    best = 0.0
    for _ in range(rounds):
        out = subprocess.run(pinned(OTHER_CPU, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                                                f"http://127.0.0.1:{port}/bulk"]),
                             capture_output=True, text=True, check=True).stdout.split()
        got, secs = int(out[0]), float(out[1])
        assert got == size, f"bulk: got {got} bytes of {size}"
        best = max(best, got / secs / 1e6)
    return best


def start_worker(tmp: Path, listen_port: int, backend: int, workers: int) -> tuple[subprocess.Popen[bytes], list[int]]:
    """The production worker (`python -m changeover.proxy.worker`) with `workers` processes."""
    from changeover.proxy.base import ProxySettings
    settings = ProxySettings(listen=f"127.0.0.1:{listen_port}", workers=workers)  # type: ignore[call-arg]
    import dataclasses
    sock = tmp / f"proxy-w{workers}.sock"
    proc = subprocess.Popen([sys.executable, "-m", "changeover.proxy.worker", "--socket", str(sock),
                             "--settings", json.dumps(dataclasses.asdict(settings)), "--initial",
                             json.dumps({"slots": {"blue": [["127.0.0.1", backend]]}, "live": "blue"})],
                            stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    msg = json.loads(proc.stdout.readline())
    pids = [int(p) for p in msg.get("pids", [msg["pid"]])]
    for i, pid in enumerate(pids):
        subprocess.run(["taskset", "-a", "-p", "-c", str(i % CPUS), str(pid)], capture_output=True, check=False)
    return proc, pids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout to run the embedded proxy from")
    ap.add_argument("--before", type=Path, default=None,
                    help="also run the embedded proxy from this checkout (row 'before'), in the same rounds")
    ap.add_argument("--conns", default="50,1000,5000")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--bulk-mb", type=int, default=500)
    ap.add_argument("--workers", default="", help="also measure the worker with these [proxy] workers counts")
    ap.add_argument("--only", default="", help="comma-separated subset of direct,changeover,haproxy")
    ap.add_argument("--somaxconn", type=int, default=0,
                    help="set net.core.somaxconn for the run (root; restored after): the accept queue cap")
    ap.add_argument("--threads", type=int, default=0, help="wrk threads (default: 1, 2 from -c2000)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds per -c (the paths take turns); each path's best req/s and lowest CPU per request")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    saved = somaxconn.read_text().strip() if args.somaxconn else ""
    if args.somaxconn:
        somaxconn.write_text(str(args.somaxconn))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="proxy-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    size = args.bulk_mb * 1_000_000
    backend, hport, eport = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if shutil.which("nginx"):
            with open(tmp / "bulk.bin", "wb") as f:
                f.truncate(size)
            tmp.chmod(0o755)                      # nginx's workers run as another user
            (tmp / "bulk.bin").chmod(0o644)
            (tmp / "nginx.conf").write_text(NGINX_CFG.format(tmp=tmp, port=backend))
            procs.append(subprocess.Popen(pinned(OTHER_CPU, ["nginx", "-c", str(tmp / "nginx.conf")])))
            kind = "nginx `return 200` (1 worker process)"
        else:
            (tmp / "backend.cfg").write_text(HAPROXY_BACKEND.format(port=backend))
            procs.append(subprocess.Popen(pinned(OTHER_CPU, ["haproxy", "-db", "-f", str(tmp / "backend.cfg")])))
            kind = "HAProxy `http-request return` (no bulk)"
        (tmp / "proxy.cfg").write_text(HAPROXY_PROXY.format(port=hport, backend=backend))
        procs.append(subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(tmp / "proxy.cfg")])))
        emb = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(eport), str(backend),
                                                  str(args.tree)]), stdout=subprocess.PIPE, cwd=args.tree)
        procs.append(emb)
        assert emb.stdout is not None
        emb.stdout.readline()
        paths = {"direct": backend, "changeover": eport, "haproxy": hport}
        pids = {"changeover": emb.pid, "haproxy": procs[1].pid}     # taskset execs: the proxies' own pids
        if args.before is not None:       # the same core, the same backend, taking turns with the others
            bport = free_port()
            before = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(bport), str(backend),
                                                         str(args.before)]), stdout=subprocess.PIPE, cwd=args.before)
            procs.append(before)
            assert before.stdout is not None
            before.stdout.readline()
            paths = {"direct": backend, "before": bport, "changeover": eport, "haproxy": hport}
            pids["before"] = before.pid
        for port in paths.values():
            wait_port(port)
        if args.only:
            paths = {k: v for k, v in paths.items() if k in args.only.split(",")}
        print(f"backend: {kind}; embedded proxy from {args.tree}"
              + (f" (before: {args.before})" if args.before else "")
              + f"; net.core.somaxconn {somaxconn.read_text().strip()}")
        for conns in [int(c) for c in args.conns.split(",") if c]:
            rows: dict[str, dict[str, float]] = {}
            for port in paths.values():
                wrk(port, 2, conns)                                   # warm-up: pools, caches
            for _ in range(args.rounds):      # the paths take turns: each keeps its best round
                for name, port in paths.items():
                    r = wrk(port, args.duration, conns, pid=pids.get(name))
                    b = rows.setdefault(name, r)
                    if b is not r:
                        low = r if r["us"] < b["us"] else b           # the lowest CPU per request
                        cpu = {k: low[k] for k in ("us", "user", "sys")}
                        if r["rps"] > b["rps"]:
                            rows[name] = b = r
                        b.update(cpu)
            print(f"\nwrk -c{conns} -d{args.duration:g}s --timeout 10s (best of {args.rounds}; load average "
                  f"{os.getloadavg()[0]:.1f})")
            print("| path | req/s | p50 ms | p99 ms | max ms | errors | proxy CPU µs/req (user / sys) |\n"
                  "|---|---|---|---|---|---|---|")
            for name, r in rows.items():
                cpu = f"{r['us']:.1f} ({r['user']:.1f} / {r['sys']:.1f})" if r["us"] else ""
                print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.0f} | "
                      f"{r['errors']:.0f} | {cpu} |")
            if "before" in rows and "changeover" in rows:
                b, c = rows["before"], rows["changeover"]
                print(f"changeover / before: CPU per request {c['us'] / max(b['us'], 0.001):.2f}x "
                      f"(user {c['user'] / max(b['user'], 0.001):.2f}x)")
            if "changeover" in rows and "haproxy" in rows:
                c, h = rows["changeover"], rows["haproxy"]
                print(f"changeover / haproxy: req/s {c['rps'] / h['rps']:.2f}x, p99 {c['p99'] / h['p99']:.2f}x, "
                      f"CPU per request {c['us'] / max(h['us'], 0.001):.2f}x (on a saturated core: "
                      f"{h['us'] / max(c['us'], 0.001):.2f}x HAProxy's req/s)")
            sys.stdout.flush()
        if shutil.which("nginx") and args.bulk_mb:
            print(f"\nbulk: one {args.bulk_mb} MB response (curl to /dev/null, best of 3)")
            print("| path | MB/s |\n|---|---|")
            got = {name: bulk(port, size) for name, port in paths.items()}
            for name, v in got.items():
                print(f"| {name} | {v:,.0f} |")
            if "changeover" in got and "haproxy" in got:
                print(f"changeover / haproxy bulk: {got['changeover'] / got['haproxy']:.2f}x")
        for n in [int(w) for w in args.workers.split(",") if w]:
            wport = free_port()
            proc, pids = start_worker(tmp, wport, backend, n)
            try:
                wait_port(wport)
                wrk(wport, 2, 1000, cpu=None)
                r = wrk(wport, args.duration, 1000, cpu=None)
                print(f"\nworker, [proxy] workers = {n} (pids {pids}, worker i on core i; wrk -c1000 and nginx "
                      f"unpinned): {r['rps']:,.0f} req/s, p99 {r['p99']:.2f} ms, errors {r['errors']:.0f}")
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        if saved:
            somaxconn.write_text(saved)
        stop(procs, tmp)


if __name__ == "__main__":
    main()
