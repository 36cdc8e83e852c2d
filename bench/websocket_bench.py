"""WebSocket echo benchmark: one 16 MB binary message sent and echoed back, direct vs through
changeover's embedded proxy vs through HAProxy, same backend, same run.

The backend is a WebSocket echo on uvloop (handshake, then every frame written back unmasked);
the client is a raw socket in this process. Each proxy is pinned to core 0, the backend and the
client to the last core (as bench/proxy_bench.py does). The client masks with a zero key (the
RFC lets it pick any key): the XOR cost stays out of the backend, which every path shares, so the
figures are the proxies' relaying. Each path: `--rounds` echoes on one connection after a warm-up
echo, median and best reported.

    flock /tmp/team/bench.lock .venv/bin/python bench/websocket_bench.py
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import EMBEDDED, OTHER_CPU, PROXY_CPU, pinned, stop, wait_port  # noqa: E402

from changeover.daemon.procs import free_port  # noqa: E402

BACKEND = r"""
import asyncio, base64, hashlib, struct, sys, uvloop
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

class Echo(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf, self.open, self.need = t, bytearray(), False, 0
    def data_received(self, data):
        if not self.open:
            self.buf += data
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head, rest = bytes(self.buf[:i]), bytes(self.buf[i + 4:])
            self.buf.clear()
            key = next(l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
                       if l.lower().startswith(b"sec-websocket-key:"))
            acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
            self.open = True
            if not rest:
                return
            data = rest
        # relay frames back: header rewritten unmasked (the client's key is zero), payload as is
        mv = memoryview(data)
        while mv:
            if self.need:
                n = min(self.need, len(mv))
                self.t.write(mv[:n])
                self.need -= n
                mv = mv[n:]
                continue
            self.buf += mv
            mv = memoryview(b"")
            b = self.buf
            if len(b) < 2:
                return
            n = b[1] & 0x7F
            hl = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if b[1] & 0x80 else 0)
            if len(b) < hl:
                return
            if n == 126:
                n = struct.unpack_from("!H", b, 2)[0]
            elif n == 127:
                n = struct.unpack_from("!Q", b, 2)[0]
            ln = bytes((b[1] & 0x7F,)) + bytes(b[2:hl - 4 if b[1] & 0x80 else hl])
            self.t.write(bytes((b[0],)) + ln)
            rest = bytes(b[hl:])
            b.clear()
            self.need = n
            mv = memoryview(rest)

async def main():
    port = int(sys.argv[1])
    await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=128)
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

HAPROXY_CFG = """
global
    nbthread 1
defaults
    mode http
    timeout client 30s
    timeout server 30s
    timeout connect 5s
    timeout tunnel 1h
frontend fe
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server blue 127.0.0.1:{blue}
"""


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16))
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"port {port}: closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"port {port}: {head[:80]!r}")
    assert head.endswith(b"\r\n\r\n"), "no frame is expected before the first message"
    return s


def echo(s: socket.socket, payload: bytes, buf: bytearray) -> float:
    """Send one binary message (masked, zero key) and read its echo; seconds from the first byte
    sent to the last byte received."""
    n = len(payload)
    header = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", n) + b"\0\0\0\0"
    want = 10 + n
    view = memoryview(buf)[:want]
    got = 0
    t0 = time.perf_counter()
    s.setblocking(False)
    out = [memoryview(header), memoryview(payload)]
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    try:
        while got < want:
            for _, ev in sel.select(30):
                if ev & selectors.EVENT_WRITE and out:
                    try:
                        sent = s.sendmsg(out[:2])
                    except BlockingIOError:
                        sent = 0
                    while sent and out:
                        if sent >= len(out[0]):
                            sent -= len(out[0])
                            out.pop(0)
                        else:
                            out[0] = out[0][sent:]
                            sent = 0
                    if not out:
                        sel.modify(s, selectors.EVENT_READ)
                if ev & selectors.EVENT_READ:
                    try:
                        k = s.recv_into(view[got:])
                    except BlockingIOError:
                        continue
                    if not k:
                        raise SystemExit("closed during the echo")
                    got += k
    finally:
        sel.close()
        s.setblocking(True)
    elapsed = time.perf_counter() - t0
    if bytes(view[:2]) != b"\x82\x7f" or struct.unpack("!Q", view[2:10])[0] != n:
        raise SystemExit(f"unexpected echo header {bytes(view[:10])!r}")
    return elapsed


def run(port: int, size: int, rounds: int) -> list[float]:
    payload = os.urandom(size)
    buf = bytearray(size + 64)
    s = connect(port)
    try:
        echo(s, payload, buf)                        # warm-up
        times = [echo(s, payload, buf) for _ in range(rounds)]
        if bytes(memoryview(buf)[10:10 + size]) != payload:
            raise SystemExit("the echo differs from the message")
        return times
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", help="another checkout of changeover, measured in the same run (before/after)")
    ap.add_argument("--before-label", default="before")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    blue, green, eport, hport = free_port(), free_port(), free_port(), free_port()
    (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=hport, blue=blue))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in (blue, green):
            b = subprocess.Popen(pinned(OTHER_CPU, [sys.executable, "-c", BACKEND, str(port)]),
                                 stdout=subprocess.PIPE, cwd=ROOT)
            procs.append(b)
            assert b.stdout is not None
            b.stdout.readline()
        emb = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, "-c", EMBEDDED, str(eport), str(blue), str(green)]),
                               stdout=subprocess.PIPE, cwd=ROOT)
        procs.append(emb)
        assert emb.stdout is not None
        emb.stdout.readline()
        before = {}
        if args.before:                              # the same proxy from another checkout, same run
            bport = free_port()
            cmd = [sys.executable, "-c", EMBEDDED, str(bport), str(blue), str(green)]
            bp = subprocess.Popen(pinned(PROXY_CPU, cmd), stdout=subprocess.PIPE, cwd=args.before)
            procs.append(bp)
            assert bp.stdout is not None
            bp.stdout.readline()
            before = {f"changeover ({args.before_label})": bport}
        have_haproxy = shutil.which("haproxy") is not None
        if have_haproxy:
            procs.append(subprocess.Popen(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")])))
        paths = {"direct": blue, "changeover": eport, **before, **({"haproxy": hport} if have_haproxy else {})}
        for port in paths.values():
            wait_port(port)
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {int(OTHER_CPU)})
        mb = args.size / 1e6
        print(f"{args.size // (1024 * 1024)} MB WebSocket echo, {args.rounds} rounds after a warm-up, one connection\n")
        print("| path | median s | best s | MB/s each way (median) |")
        print("|---|---:|---:|---:|")
        med: dict[str, float] = {}
        for name, port in paths.items():
            times = run(port, args.size, args.rounds)
            med[name] = statistics.median(times)
            print(f"| {name} | {med[name]:.3f} | {min(times):.3f} | {mb / med[name]:,.0f} |")
        if "haproxy" in med:
            print(f"\nchangeover / haproxy time: {med['changeover'] / med['haproxy']:.2f}x "
                  f"(target <= 2x); changeover / direct: {med['changeover'] / med['direct']:.2f}x")
    finally:
        stop(procs, tmp)


if __name__ == "__main__":
    main()
