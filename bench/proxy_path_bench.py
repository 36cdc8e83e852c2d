"""The embedded proxy's Python per request, without sockets: CPU µs for one keep-alive GET.

    taskset -c 0 .venv/bin/python bench/proxy_path_bench.py [--tree DIR] [--rounds 25]

A `ClientConn` and a pooled `UpstreamConn` with transports that only take the bytes: each
request is a wrk-like head read by the client side, then an nginx-like response read by the app
side, as uvloop delivers them (a new bytes object per read), with the monitor's `Recorder` as in
production. What it leaves out is the kernel (the reads, writes and epoll) and uvloop itself: the
part the proxy's own code decides. The figure is thread CPU time, best of `--rounds` rounds of
20,000 requests, so other load on the machine moves it far less than a wall-clock figure.
`--tree` measures another checkout (e.g. a `git worktree` of an older commit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 18:30:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose proxy is measured")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--requests", type=int, default=20_000)
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import changeover
    from changeover.monitor.metrics import Recorder
    from changeover.proxy.base import ProxySettings
    from changeover.proxy.client import ClientConn
    from changeover.proxy.embedded import EmbeddedProxy
    from changeover.proxy.upstream import UpstreamConn

    assert Path(changeover.__file__).resolve().is_relative_to(args.tree.resolve()), changeover.__file__
    proxy = EmbeddedProxy(ProxySettings(listen="127.0.0.1:0"), Recorder())
    proxy.set_slot("blue", [("127.0.0.1", 9)])
    proxy.switch("blue")
    client = ClientConn(proxy)
    client.connection_made(_Transport())  # type: ignore[arg-type]
    instance = proxy.slots["blue"].upstreams[0]
    app = UpstreamConn(instance)
    app.connection_made(_Transport())  # type: ignore[arg-type]
    instance.idle.append(app)
    best = float("inf")
    for _ in range(args.rounds):
        reqs = [bytes(bytearray(REQUEST)) for _ in range(args.requests)]    # new objects, as uvloop reads them
        resps = [bytes(bytearray(RESPONSE)) for _ in range(args.requests)]
        t0 = time.thread_time()
        for req, resp in zip(reqs, resps, strict=True):
            client.data_received(req)
            app.data_received(resp)
        best = min(best, (time.thread_time() - t0) / args.requests * 1e6)
    assert proxy.slots["blue"].inflight == 0 and instance.idle == [app], "a request did not complete"
    print(f"{args.tree}: {best:.2f} µs of Python per request (best of {args.rounds} x {args.requests:,})")


if __name__ == "__main__":
    main()
