"""Example app for changeover: serves HTTP on $PORT, with sessions, a database probe and faults.

Standard library only (redis-py and psycopg are used when importable), so it runs anywhere.
The tests and `make demo` use it as "the user's app".

Endpoints: /  /health  /slow?ms=N  /echo (POST)  /login (POST)  /me  /cart (GET, POST)  /items  /ws

Faults, for tests and demos:
  at start (env):  FAULT_HEALTH=fail       health answers 503
                   FAULT_VERSION=x         health reports version x
                   FAULT_EXIT=1            exit(1) at once
                   FAULT_START_DELAY=s     sleep before listening
  at run time:     FAULT_FILE=path         JSON re-read when it changes:
                   {"error_rate": 0.1, "latency_ms": 200, "health": "fail", "db": "down", "crash": true,
                    "exit": true,          (exit within 0.1 s, requests or not: a crash loop)
                    "only_version": "v3"}   (faults apply only to that release when set)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import secrets
import signal
import sqlite3
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

VERSION = os.environ.get("FAULT_VERSION") or os.environ.get("API_VERSION", "dev")
FAULT_FILE = os.environ.get("FAULT_FILE")
DATABASE_URL = os.environ.get("DATABASE_URL", "")
ITEMS_QUERY = os.environ.get("ITEMS_QUERY", "SELECT 1")
DRILL_COPY = os.environ.get("CHANGEOVER_DRILL") == "1"   # started by `changeover drill`: says so
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_fault: dict[str, Any] = {}
_fault_mtime = 0.0
_active = 0
_lock = threading.Lock()
_sessions: dict[str, dict[str, Any]] = {}


def faults() -> dict[str, Any]:
    """The run-time faults, re-read when FAULT_FILE changes. A fault with "only_version" applies
    only to that release, so one file can break v3 while v1 runs from the same file."""
    global _fault, _fault_mtime
    if not FAULT_FILE:
        return _fault
    try:
        mtime = os.stat(FAULT_FILE).st_mtime_ns
    except OSError:
        _fault, _fault_mtime = {}, 0.0
        return _fault
    if mtime != _fault_mtime:
        try:
            with open(FAULT_FILE) as f:
                new = json.load(f) or {}
        except (OSError, ValueError):
            new = {}
        if new.get("only_version") not in (None, VERSION):
            new = {}
        _fault, _fault_mtime = new, mtime  # one assignment: other threads never see a half-read fault
    return _fault


class Sessions:
    """Sessions in Redis when REDIS_URL is set (they survive deploys), else in this process."""

    def __init__(self) -> None:
        self.redis: Any = None
        url = os.environ.get("REDIS_URL")
        if url:
            import redis  # type: ignore[import-not-found]

            self.redis = redis.Redis.from_url(url, socket_timeout=2)

    def get(self, sid: str) -> dict[str, Any] | None:
        if self.redis is not None:
            raw = self.redis.get(f"session:{sid}")
            return json.loads(raw) if raw else None
        return _sessions.get(sid)

    def put(self, sid: str, data: dict[str, Any]) -> None:
        if self.redis is not None:
            self.redis.set(f"session:{sid}", json.dumps(data), ex=3600)
        else:
            _sessions[sid] = data


def db_query(sql: str) -> list[tuple[Any, ...]]:
    if DATABASE_URL.startswith(("postgres://", "postgresql://")):
        import psycopg  # type: ignore[import-not-found]

        with psycopg.connect(DATABASE_URL, connect_timeout=2) as conn:
            return list(conn.execute(sql).fetchall())
    path = DATABASE_URL.removeprefix("sqlite:///").removeprefix("sqlite://") or ":memory:"
    conn = sqlite3.connect(path, timeout=2)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "example-app"
    # Head and body leave in one write, with Nagle off: otherwise the body waits for the peer's
    # delayed ACK of the head (40 ms on Linux) on every response.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    sessions: Sessions

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("APP_ACCESS_LOG"):
            super().log_message(format, *args)

    def send(self, status: int, body: Any, ctype: str = "application/json", headers: dict[str, str] | None = None
             ) -> None:
        data = body if isinstance(body, bytes) else (
            json.dumps(body).encode() if ctype == "application/json" else str(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Version", VERSION)
        if DRILL_COPY:
            self.send_header("X-Drill-Copy", "1")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def json_body(self) -> dict[str, Any]:
        raw = self.body()
        if not raw:
            return {}
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            return dict(json.loads(raw))
        return {k: v[0] for k, v in parse_qs(raw.decode()).items()}

    def session_id(self) -> str | None:
        for part in (self.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "sid":
                return v
        return None

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.route()

    def do_POST(self) -> None:
        self.route()

    def route(self) -> None:
        global _active
        with _lock:
            _active += 1
        try:
            self.dispatch()
        finally:
            with _lock:
                _active -= 1

    def dispatch(self) -> None:
        url = urlparse(self.path)
        f = faults()
        if f.get("crash"):
            os._exit(3)
        if url.path == "/health":
            return self.health(f)
        if f.get("latency_ms"):
            time.sleep(float(f["latency_ms"]) / 1000)
        if f.get("error_rate") and random.random() < float(f["error_rate"]):
            return self.send(500, {"error": "injected fault"})
        q = parse_qs(url.query)
        try:
            if url.path == "/":
                return self.send(200, f"hello from {VERSION}\n", "text/plain")
            if url.path == "/slow":
                time.sleep(float(q.get("ms", ["1000"])[0]) / 1000)
                return self.send(200, f"slow from {VERSION}\n", "text/plain")
            if url.path == "/echo":
                return self.send(200, self.body(), self.headers.get("Content-Type", "application/octet-stream"))
            if url.path == "/login" and self.command == "POST":
                user = self.json_body().get("user", "guest")
                sid = secrets.token_hex(16)
                self.sessions.put(sid, {"user": user, "cart": []})
                return self.send(200, {"user": user, "version": VERSION},
                                 headers={"Set-Cookie": f"sid={sid}; Path=/; HttpOnly"})
            if url.path in ("/me", "/cart"):
                sid = self.session_id()
                sess = self.sessions.get(sid) if sid else None
                if sess is None:
                    return self.send(401, {"error": "not signed in"})
                if url.path == "/cart" and self.command == "POST":
                    sess["cart"].append(self.json_body().get("item"))
                    self.sessions.put(sid or "", sess)
                return self.send(200, {**sess, "version": VERSION})
            if url.path == "/items":
                rows = db_query(ITEMS_QUERY)
                return self.send(200, {"rows": len(rows), "version": VERSION})
            if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
                return self.websocket()
        except Exception as e:  # an app error is a 500, as in any framework
            return self.send(500, {"error": f"{type(e).__name__}: {e}"})
        return self.send(404, {"error": "not found"})

    def health(self, f: dict[str, Any]) -> None:
        body: dict[str, Any] = {"status": "ok", "version": f.get("version", VERSION)}
        status = 200
        if os.environ.get("FAULT_HEALTH") == "fail" or f.get("health") == "fail":
            body["status"], status = "failing", 503
        if DATABASE_URL:
            try:
                if f.get("db") == "down":
                    raise ConnectionError("database unreachable (injected)")
                db_query("SELECT 1")
                body["db"] = "ok"
            except Exception as e:
                body["db"], body["db_error"], status = "down", str(e)[:200], 503
        self.send(status, body)

    def websocket(self) -> None:
        """A minimal RFC 6455 echo (text/binary frames, ping, close), enough for tunnel tests."""
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                self.close_connection = True
                return
            if opcode == 9:
                opcode = 10
            out = bytes([0x80 | opcode])
            out += bytes([len(data)]) if len(data) < 126 else (
                b"\x7e" + struct.pack("!H", len(data)) if len(data) < 65536 else b"\x7f" + struct.pack("!Q", len(data)))
            self.wfile.write(out + data)
            self.wfile.flush()


def main() -> None:
    if os.environ.get("FAULT_EXIT"):
        print("exiting on purpose (FAULT_EXIT)", file=sys.stderr)
        sys.exit(1)
    time.sleep(float(os.environ.get("FAULT_START_DELAY", "0")))
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ["PORT"])
    Handler.sessions = Sessions()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def stop(*_: Any) -> None:
        # Graceful: stop accepting, let requests in flight finish (up to 10 s), then exit.
        def run() -> None:
            server.shutdown()
            deadline = time.monotonic() + 10
            while _active and time.monotonic() < deadline:
                time.sleep(0.02)
            os._exit(0)

        threading.Thread(target=run, daemon=True).start()

    def exit_watch() -> None:
        while True:
            time.sleep(0.1)
            if faults().get("exit"):
                print("exiting on purpose (fault: exit)", file=sys.stderr, flush=True)
                os._exit(3)

    threading.Thread(target=exit_watch, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"example app {VERSION} listening on 127.0.0.1:{port} (pid {os.getpid()})", flush=True)
    server.serve_forever(poll_interval=0.1)
    while True:  # shutdown() returned; the stop thread exits the process
        time.sleep(1)


if __name__ == "__main__":
    main()
