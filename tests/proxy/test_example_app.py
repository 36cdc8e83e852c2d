"""The example app (a real ThreadingHTTPServer process) behind the embedded proxy, WebSocket included."""

from __future__ import annotations

import base64
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy

from .conftest import LoopThread, raw, read_head, read_response

APP = Path(__file__).resolve().parents[2] / "examples" / "app" / "server.py"


@pytest.fixture
def app_proxy(lt: LoopThread) -> Iterator[EmbeddedProxy]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PORT": str(port)}
    proc = subprocess.Popen([sys.executable, str(APP), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "example app did not start"
            time.sleep(0.05)
    p = EmbeddedProxy(ProxySettings(listen="127.0.0.1:0"))
    lt.run(p.start())
    lt.call(p.set_slot, "blue", [("127.0.0.1", port)])
    lt.call(p.switch, "blue")
    yield p
    lt.run(p.close())
    proc.terminate()
    proc.wait(5)


def test_example_app_http(app_proxy: EmbeddedProxy) -> None:
    with raw(app_proxy.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 200
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        status, _, body = read_response(s)
        assert status == 200 and b"hello" in body
        s.sendall(b"GET /slow?ms=50 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 200


def _frame(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def test_example_app_websocket(lt: LoopThread, app_proxy: EmbeddedProxy) -> None:
    key = base64.b64encode(os.urandom(16))
    with raw(app_proxy.port) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        status, headers = read_head(s)
        assert status == 101 and "sec-websocket-accept" in headers
        s.sendall(_frame(b"ping"))
        first = s.recv(2)
        while len(first) < 2:
            first += s.recv(2 - len(first))
        n = first[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        assert b"ping" in data
        assert lt.call(app_proxy.inflight, "blue") == 1
