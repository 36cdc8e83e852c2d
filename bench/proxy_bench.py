"""Proxy benchmark: direct vs changeover's embedded proxy vs HAProxy vs changeover driving HAProxy
(the `[proxy] engine = "haproxy"` data plane), and switches under load.

    .venv/bin/python bench/proxy_bench.py [--duration 10] [--connections 50] [--switches 100]

The backend is HAProxy itself answering `http-request return` (faster than either proxy), pinned
to the last core with wrk; each proxy is pinned to core 0 (nbthread 1 for HAProxy). All paths are
measured in one run, side by side, so the ratios hold even on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from changeover.daemon.procs import free_port  # noqa: E402

CPUS = os.cpu_count() or 1
PROXY_CPU = "0"
OTHER_CPU = str(CPUS - 1)



def pinned(cpu: str | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if cpu is not None and shutil.which("taskset") and CPUS > 1 else cmd


def stop(procs: list[subprocess.Popen[bytes]], tmp: Path) -> None:
    """End a bench's processes (terminate, then kill what is left after 5 s) and its files."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


BACKEND_CFG = """
global
    nbthread 1
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
frontend blue
    bind 127.0.0.1:{blue}
    http-request return status 200 content-type text/plain string blue
frontend green
    bind 127.0.0.1:{green}
    http-request return status 200 content-type text/plain string green
"""

PROXY_CFG = """
global
    nbthread 1
    stats socket {sock} level admin
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
    timeout http-keep-alive 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    default_backend app
backend app
    balance roundrobin
    http-reuse always
    server blue 127.0.0.1:{blue} weight 100
    server green 127.0.0.1:{green} weight 0
"""

# Raw HAProxy doing what any production config does, and what the engine's config does too: an
# X-Forwarded-For header and a log line per request (to a ring in memory, as the engine's).
WORK_CFG = PROXY_CFG.replace("    stats socket", "    log ring@r1 len 1024 format raw local0 info\n    stats socket") \
    .replace("defaults\n", "ring r1\n    format raw\n    maxlen 1024\n    size 1048576\n"
             "defaults\n    log global\n    option httplog\n    option forwardfor\n")

EMBEDDED = """
import asyncio, signal, sys, uvloop
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.monitor.metrics import Recorder
port, blue, green = map(int, sys.argv[1:4])
async def main():
    # As in production (changeover/proxy/worker.py): every request is recorded for the monitor.
    p = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{port}"), Recorder())
    await p.start()
    p.set_slot("blue", [("127.0.0.1", blue)])
    p.set_slot("green", [("127.0.0.1", green)])
    p.switch("blue")
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: p.switch("green" if p.live == "blue" else "blue"))
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU time a process has used (from /proc): in a proxy, system time is mostly
    the socket calls and the loopback TCP work they do, user time the proxy's own code."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def wrk(port: int, duration: float, conns: int, pid: int | None = None) -> dict[str, float]:
    """wrk's figures; with `pid`, also the CPU time that process spent per request, which other
    engineers' load on the machine moves far less than req/s (it is what a proxy's own cost is)."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        pinned(OTHER_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency",
                           f"http://127.0.0.1:{port}/"]),
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def lat(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    result = {"rps": rps, "p50": lat("50"), "p99": lat("99"), "errors": errors, "us_per_req": 0.0}
    if pid:
        n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        result["us_per_req"] = (cpu_seconds(pid) - cpu0) / max(n, 1) * 1e6
    return result


def haproxy_cmd(sock: str, cmd: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(cmd.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def switch_under_load(port: int, duration: float, conns: int, switches: int, do_switch: object) -> dict[str, float]:
    """wrk for `duration` while `switches` switches happen at even intervals."""
    proc = subprocess.Popen(
        pinned(OTHER_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", f"http://127.0.0.1:{port}/"]),
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    gap = (duration - 1.5) / switches
    for _ in range(switches):
        do_switch()  # type: ignore[operator]
        time.sleep(gap)
    out, _ = proc.communicate()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pat in (r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                r"Non-2xx or 3xx responses: (\d+)"):
        m = re.search(pat, out)
        if m:
            errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "errors": errors}


class EnginePlane:
    """changeover driving HAProxy: `HAProxyControl` (the engine the daemon uses for
    `[proxy] engine = "haproxy"`) with its generated config, runtime-API switching and its
    per-request log read into a Recorder, in this process (pinned with wrk, as a daemon would
    run beside the proxy). HAProxy's master and worker are pinned like the other proxies."""

    def __init__(self, blue: int, green: int, state_dir: Path, **settings: Any) -> None:
        import threading

        import uvloop

        from changeover.proxy.base import DEFAULT_HAPROXY_MAX_HEADER_BYTES, ProxySettings
        from changeover.proxy.haproxy_engine import HAProxyControl

        self.loop = uvloop.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.control = HAProxyControl(
            ProxySettings(listen=f"127.0.0.1:{free_port()}", engine="haproxy",
                          **{"max_header_bytes": DEFAULT_HAPROXY_MAX_HEADER_BYTES, **settings}), state_dir)
        self.run(self.control.ensure({"slots": {"blue": [["127.0.0.1", blue]], "green": [["127.0.0.1", green]]},
                                      "versions": {"blue": "b1", "green": "g1"}, "live": "blue"}))
        assert self.control.pid is not None and self.control.port is not None
        self.port = self.control.port
        if shutil.which("taskset") and CPUS > 1:
            master = self.control.pid
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
            for pid in [str(master), *children]:
                subprocess.run(["taskset", "-a", "-p", "-c", PROXY_CPU, pid], capture_output=True, check=False)
        self.live = "blue"
        # as the daemon does: pull the metrics every 100 ms (which also keeps the log reader up)
        self.puller = asyncio.run_coroutine_threadsafe(self._pull(), self.loop)

    async def _pull(self) -> None:
        while True:
            await self.control.metrics(None)
            await asyncio.sleep(0.1)

    def worker(self) -> int:
        assert self.control.pid is not None
        return int(Path(f"/proc/{self.control.pid}/task/{self.control.pid}/children").read_text().split()[0])

    def run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def flip(self) -> None:
        self.live = "green" if self.live == "blue" else "blue"
        self.run(self.control.switch(self.live))

    def counted(self) -> dict[str, int]:
        counts = dict(self.run(self.control.lost()))  # type: ignore[call-overload]
        return {**counts, "restarts": self.control.follower.restarts}

    def close(self) -> None:
        self.puller.cancel()
        self.run(self.control.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--switches", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the throughput runs, keep each path's best")
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")   # engine trouble shows
    tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    blue, green, hport, eport, wport = free_port(), free_port(), free_port(), free_port(), free_port()
    sock = str(tmp / "haproxy.sock")
    (tmp / "backend.cfg").write_text(BACKEND_CFG.format(blue=blue, green=green))
    (tmp / "proxy.cfg").write_text(PROXY_CFG.format(sock=sock, port=hport, blue=blue, green=green))
    procs: list[subprocess.Popen[bytes]] = []
    planes: list[EnginePlane] = []
    try:
        procs.append(subprocess.Popen(pinned(OTHER_CPU, ["haproxy", "-db", "-f", str(tmp / "backend.cfg")])))
        procs.append(subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(tmp / "proxy.cfg")])))
        (tmp / "work.cfg").write_text(WORK_CFG.format(sock=tmp / "work.sock", port=wport, blue=blue, green=green))
        procs.append(subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(tmp / "work.cfg")])))
        emb = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(eport), str(blue), str(green)]),
                               stdout=subprocess.PIPE, cwd=ROOT)
        procs.append(emb)
        assert emb.stdout is not None
        emb.stdout.readline()
        for port in (blue, green, hport, eport):
            wait_port(port)
        if shutil.which("taskset") and CPUS > 1:
            os.sched_setaffinity(0, {int(OTHER_CPU)})     # this process reads the engine's log
        plane = EnginePlane(blue, green, tmp / "engine")      # its defaults: 15 KB heads, as HAProxy's
        # HAProxy sizes its buffers to the longest request head it accepts: 64 KB heads cost it
        # ~30 % more CPU per request than its own default of 16 KB buffers
        big = EnginePlane(blue, green, tmp / "engine-64k", max_header_bytes=64 * 1024)
        planes.extend((plane, big))
        wait_port(plane.port)
        wait_port(big.port)
        paths = {"direct": blue, "changeover": eport, "haproxy": hport, "haproxy+work": wport,
                 "changeover+haproxy": plane.port, "changeover+haproxy, 64 KB heads": big.port}
        # the process doing each proxy's work (taskset execs, so the pids are the proxies')
        pids = {"changeover": emb.pid, "haproxy": procs[1].pid, "haproxy+work": procs[2].pid,
                "changeover+haproxy": plane.worker(), "changeover+haproxy, 64 KB heads": big.worker()}
        cost: dict[str, list[float]] = {}
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for name, port in paths.items():
                wrk(port, 1, args.connections)               # warm-up: pools, caches
                r = wrk(port, args.duration, args.connections, pids.get(name))
                if name not in best or r["rps"] > best[name]["rps"]:
                    best[name] = r
                if name in pids:
                    cost.setdefault(name, []).append(r["us_per_req"])
        print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s, best of {args.rounds}")
        print("| path | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
        for name, r in best.items():
            print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']:.0f} |")
        ratio = best["changeover"]["rps"] / best["haproxy"]["rps"]
        overhead = best["changeover"]["p50"] - best["direct"]["p50"]
        print(f"\nchangeover / haproxy req/s: {ratio:.2f}x; p50 overhead over direct: {overhead:.2f} ms")
        for name in ("changeover+haproxy", "changeover+haproxy, 64 KB heads"):
            print(f"{name} / raw HAProxy req/s: {best[name]['rps'] / best['haproxy']['rps']:.2f}x; "
                  f"/ raw HAProxy with forwardfor + log: {best[name]['rps'] / best['haproxy+work']['rps']:.2f}x")
        print("\nproxy CPU time per request, µs (median of the rounds; lower is better)")
        print("| path | µs/req | rounds |\n|---|---|---|")
        med = {name: sorted(v)[len(v) // 2] for name, v in cost.items()}
        for name, v in cost.items():
            print(f"| {name} | {med[name]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
        for name in ("changeover+haproxy", "changeover+haproxy, 64 KB heads"):
            print(f"raw HAProxy / {name}, per-request CPU: {med['haproxy'] / med[name]:.2f}x "
                  f"(with forwardfor + log: {med['haproxy+work'] / med[name]:.2f}x; "
                  "the req/s ratio a saturated proxy core would give)")

        # latency added per request without queueing: one connection, one request at a time
        one = {name: wrk(port, min(args.duration, 5), 1) for name, port in paths.items()}
        print("\nwrk -t1 -c1 (no queueing): p50 / p99 ms")
        print("| path | req/s | p50 ms | p99 ms |\n|---|---|---|---|")
        for name, r in one.items():
            print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.3f} | {r['p99']:.3f} |")
        for name in ("changeover", "haproxy", "changeover+haproxy", "changeover+haproxy, 64 KB heads"):
            print(f"{name} p50 overhead over direct at -c1: {one[name]['p50'] - one['direct']['p50']:.3f} ms")

        state = {"live": "blue"}

        def hswitch() -> None:
            new, old = ("green", "blue") if state["live"] == "blue" else ("blue", "green")
            haproxy_cmd(sock, f"set weight app/{new} 100; set weight app/{old} 0")  # new up first
            state["live"] = new

        def eswitch() -> None:
            emb.send_signal(signal.SIGUSR1)

        dur = max(args.duration, 10)
        s_emb = switch_under_load(eport, dur, args.connections, args.switches, eswitch)
        s_ha = switch_under_load(hport, dur, args.connections, args.switches, hswitch)
        before = plane.counted()
        s_drv = switch_under_load(plane.port, dur, args.connections, args.switches, plane.flip)
        time.sleep(1)                                   # the last log lines reach the engine
        after = plane.counted()
        print(f"\n{args.switches} switches under load ({dur:g}s, {args.connections} connections)")
        print("| path | req/s | failed requests |\n|---|---|---|")
        print(f"| changeover (switch()) | {s_emb['rps']:,.0f} | {s_emb['errors']:.0f} |")
        print(f"| haproxy (runtime API set weight, new first) | {s_ha['rps']:,.0f} | {s_ha['errors']:.0f} |")
        print(f"| changeover driving HAProxy (HAProxyControl.switch) | {s_drv['rps']:,.0f} | "
              f"{s_drv['errors']:.0f} |")
        served, logged = after["served"] - before["served"], after["logged"] - before["logged"]
        print(f"\nchangeover driving HAProxy, during the switches: HAProxy served {served:,}, the engine's "
              f"metrics counted {logged:,} ({after['dropped_logs']} log lines dropped by HAProxy, "
              f"{after['restarts'] - before['restarts']} log reader restarts)")
    finally:
        for p_ in planes:
            p_.close()
        stop(procs, tmp)


if __name__ == "__main__":
    main()
