"""HTTPS benchmark: changeover's embedded proxy terminating TLS vs HAProxy terminating TLS, on the
same backend, in the same run.

    .venv/bin/python bench/tls_bench.py [--duration 10] [--connections 50] [--rounds 3]

Both proxies get the same EC P-256 certificate (made here with `cryptography`), TLS 1.2+ with
ECDHE AEAD suites, one core (core 0; HAProxy nbthread 1; changeover one worker process); wrk
and the backend (HAProxy answering `http-request return`) share the other core. Measured:
keep-alive requests per second over HTTPS (the goal is >= 0.7x HAProxy), new TLS connections
per second (wrk with `Connection: close`: a full handshake per request, no resumption), and the
same proxies over plain HTTP for the cost of TLS itself. Best of `--rounds`, paths interleaved.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import BACKEND_CFG, OTHER_CPU, PROXY_CPU, cpu_seconds, pinned, stop, wait_port  # noqa: E402

from changeover.daemon.procs import free_port  # noqa: E402

HAPROXY_TLS_CFG = """
global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers ECDHE+AESGCM:ECDHE+CHACHA20
    tune.ssl.default-dh-param 2048
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
    timeout http-keep-alive 30s
    option http-keep-alive
    option forwardfor
frontend fe
    bind 127.0.0.1:{http}
    bind 127.0.0.1:{https} ssl crt {pem} alpn http/1.1
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    default_backend app
backend app
    http-reuse always
    server blue 127.0.0.1:{blue}
"""

EMBEDDED = """
import asyncio, sys, uvloop
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.tls_settings import TlsSettings
from changeover.monitor.metrics import Recorder
http, https, blue, cert = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
async def main():
    tls = TlsSettings(listen=f"127.0.0.1:{https}", certificates=((cert, ""),))
    # As in production (changeover/proxy/worker.py): every request is recorded for the monitor.
    p = EmbeddedProxy(ProxySettings(listen=f"127.0.0.1:{http}", tls=tls), Recorder())
    await p.start()
    p.set_slot("blue", [("127.0.0.1", blue)])
    p.switch("blue")
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def certificate(directory: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = directory / "bench.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem


def wrk(url: str, duration: float, conns: int, *extra: str, pid: int = 0) -> dict[str, float]:
    """wrk's req/s, p50 and errors, and the CPU time the proxy (`pid`) spent per request: req/s
    swings with what else runs on the machine, CPU per request much less."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(pinned(OTHER_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency", *extra,
                                            url]), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out)
    p50 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else 0.0
    errors = 0
    for pat in (r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                r"Non-2xx or 3xx responses: (\d+)"):
        found = re.search(pat, out)
        if found:
            errors += sum(int(x) for x in found.groups())
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    us = (cpu_seconds(pid) - cpu0) / max(n, 1) * 1e6 if pid else 0.0
    return {"rps": rps, "p50": p50, "errors": errors, "us": us}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("haproxy"):
        raise SystemExit("needs wrk and haproxy (scripts/ensure-services.sh)")
    tmp = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    pem = certificate(tmp)
    blue, green = free_port(), free_port()
    ports = {name: (free_port(), free_port()) for name in ("changeover", "haproxy")}
    (tmp / "backend.cfg").write_text(BACKEND_CFG.format(blue=blue, green=green))
    (tmp / "proxy.cfg").write_text(HAPROXY_TLS_CFG.format(http=ports["haproxy"][0], https=ports["haproxy"][1],
                                                          pem=pem, blue=blue))
    procs = [subprocess.Popen(pinned(OTHER_CPU, ["haproxy", "-db", "-f", str(tmp / "backend.cfg")])),
             subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(tmp / "proxy.cfg")]))]
    emb = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(ports["changeover"][0]),
                                              str(ports["changeover"][1]), str(blue), str(pem)]),
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    procs.append(emb)
    try:
        assert emb.stdout is not None and emb.stdout.readline().strip() == "ready"
        for http, https in ports.values():
            wait_port(http)
            wait_port(https)
        pids = {"changeover": emb.pid, "haproxy": procs[1].pid}
        tests = {
            "https keep-alive": lambda http, https, pid: wrk(f"https://127.0.0.1:{https}/", args.duration,
                                                             args.connections, pid=pid),
            "https new connection per request": lambda http, https, pid: wrk(
                f"https://127.0.0.1:{https}/", args.duration, args.connections, "-H", "Connection: close", pid=pid),
            "http keep-alive": lambda http, https, pid: wrk(f"http://127.0.0.1:{http}/", args.duration,
                                                            args.connections, pid=pid),
        }
        best: dict[tuple[str, str], dict[str, float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for test, run in tests.items():
                for name, (http, https) in ports.items():
                    wrk(f"http://127.0.0.1:{http}/", 1, args.connections)   # warm-up: pools, caches
                    r = run(http, https, pids[name])
                    key = (test, name)
                    cpu.setdefault(key, []).append(r["us"])
                    if key not in best or r["rps"] > best[key]["rps"]:
                        best[key] = r
                    time.sleep(0.2)
        print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s, best of {args.rounds}; "
              f"one core per proxy, wrk + backend on the other\n")
        print("| test | changeover req/s | HAProxy req/s | req/s ratio | proxy CPU µs/request, median "
              "(changeover / HAProxy) | CPU ratio (HAProxy / changeover) | p50 ms | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for test in tests:
            c, h = best[(test, "changeover")], best[(test, "haproxy")]
            cu, hu = (sorted(cpu[(test, n)])[len(cpu[(test, n)]) // 2] for n in ("changeover", "haproxy"))
            print(f"| {test} | {c['rps']:,.0f} | {h['rps']:,.0f} | {c['rps'] / h['rps']:.2f}x | "
                  f"{cu:.1f} / {hu:.1f} | {hu / cu:.2f}x | {c['p50']:.2f} / {h['p50']:.2f} | "
                  f"{c['errors']:.0f} / {h['errors']:.0f} |")
    finally:
        stop(procs, tmp)


if __name__ == "__main__":
    main()
