"""The client side of the embedded proxy: one `ClientConn` per accepted connection.

Per request: the head is validated by llhttp, rewritten once (`http1`), routed to the slot that is
live *at that moment* and written to a pooled upstream connection straight from this callback (no
task, no coroutine). Request bodies stream through with flow control; the response comes back
through `UpstreamConn`, which calls `response_done()` (`exchange.py` holds how an exchange ends).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from changeover.proxy.exchange import MAX_PENDING, REPLAYABLE, SAFE_REUSE_IDLE, VALIDATE, Exchange
from changeover.proxy.http1 import (
    HOST,
    REQ_SPECIAL,
    ChunkScanner,
    HttpError,
    error_response,
    origin_form,
    rewrite_request,
)
from changeover.proxy.states import (
    D_BODY,
    D_HEAD,
    D_IDLE,
    D_NONE,
    D_RESPONSE,
    P_CONNECT,
    P_DELAY,
    P_PIPELINE,
    S_BODY,
    S_HEAD,
    S_TUNNEL,
    S_WAIT,
    perf,
)
from changeover.proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from changeover.proxy.routes import Routable

# connections from one untrusted address that may hold an unfinished request head at once: a
# head normally arrives in one read, so only a slow (slowloris) client holds many
MAX_PARTIAL_HEADS_PER_CLIENT = 64


class ClientConn(Exchange):
    __slots__ = ()
    https = False                          # arrived over TLS (proxy/tls.py's subclass says True)

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.ip = (peer[0] if isinstance(peer, tuple) else "unix").encode()
        self.fwd = self.proxy.forwarded_headers(self.ip)
        self.trusted = self.proxy.trusted(self.ip)
        self.proxy.clients.add(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == S_HEAD:
            if self.buf:
                self._head_more(data)
            else:
                self._head(data)
        elif state == S_BODY:
            self._body(data)
        elif state == S_TUNNEL and self.up is not None:
            self.tun_active = self.proxy.now
            if self.ws_in is None:
                self.up.transport.write(data)
            else:
                self.tunnel_in(data)
        else:                              # pipelined request, or bytes before an upgrade completes
            self.buf += data
            self.pause(P_PIPELINE)

    def eof_received(self) -> bool | None:
        if self.state in (S_WAIT, S_BODY) and self.req_slot is not None:
            self.req_keep = False          # half-closed client: still send it the response
            return True
        return None

    # -- request head ------------------------------------------------------------------------
    def _head(self, data: bytes) -> None:
        """A request head from its first byte (nothing buffered): the common case is a whole head
        in one read, handled without a copy."""
        proxy = self.proxy
        settings = proxy.settings
        if data[0] < 14:
            # empty lines before a request line are ignored (RFC 9112 §2.2); a bare CR is refused
            rest = data.lstrip(b"\r\n")
            empty = data[:len(data) - len(rest)]
            cr_pending = not rest and empty[-1] == 13    # a CRLF split across reads
            if empty.count(b"\r") - cr_pending != empty.count(b"\r\n"):
                return self.reject(400)
            if not rest:
                return self._wait_head(b"\r" if cr_pending else b"")
            data = rest
        end = data.find(b"\r\n\r\n") + 4
        if end == 3:
            return self._partial(data)
        if end > settings.max_header_bytes:
            return self._too_big(data)
        head = data if end == len(data) else data[:end]
        rest = data[end:]
        upgrade = False
        try:
            self.parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError:
            return self.reject(400)
        # llhttp checked the method and the target's bytes but also reads `GET /HTTP/1.1` and
        # `GET /w<LF>X: y HTTP/1.1` as HTTP/0.9 and lets `GET /  HTTP/1.1` pass: the app may read
        # those differently (a desync). So the line must be exactly `method SP target SP
        # HTTP/1.x CRLF`: its first LF ends it after a CR, and the first space after the method
        # is the one before the version.
        lf = head.find(b"\n")
        version = head[lf - 10:lf]         # SP HTTP/1.x CR
        if version != b" HTTP/1.1\r" and version != b" HTTP/1.0\r":
            return self.reject(505 if version[1:7] == b"HTTP/2" or version[1:7] == b"HTTP/3" else 400)
        method = self.parser.get_method()
        target = len(method) + 1
        if head.find(b" ", target) != lf - 10:
            return self.reject(400)
        if method == b"CONNECT":
            return self.reject(405)
        if head[target] != 47 and head[target:target + 2] != b"* ":
            try:
                head = origin_form(head)   # absolute-form: the app gets the path, Host from the URI
            except HttpError as e:
                return self.reject(e.status)
        self.req_http11 = http11 = version == b" HTTP/1.1\r"
        self.req_keep = http11
        self.req_head_only = method == b"HEAD"
        length = 0
        chunked = False
        if REQ_SPECIAL.search(head) is None:
            m = HOST.search(head)
            if m is None:
                if self.req_http11:
                    return self.reject(400)
                out = head[:-2] + self.fwd + b"\r\n"
            else:
                if HOST.search(head, m.end() - 2) is not None:
                    return self.reject(400)    # two Hosts: which one would the app believe?
                out = head[:-2] + self.fwd + b"X-Forwarded-Host: " + m.group(1) + b"\r\n\r\n"
            self.req_upgrade = False
            drill = b""
        else:
            try:
                r = rewrite_request(head, self.ip, upgrade, http11, self.trusted, self.https)
            except HttpError as e:
                return self.reject(e.status)
            if self.req_http11 and HOST.search(head) is None:
                return self.reject(400)
            length, chunked, out = r.length, r.chunked, r.out
            self.req_keep = r.keep_alive
            self.req_upgrade = r.upgrade
            if chunked and not self.req_http11:
                return self.reject(400)
            if settings.max_body_bytes and length > settings.max_body_bytes:
                return self.reject(413)
            if length or chunked or upgrade:
                self.parser = httptools.HttpRequestParser(VALIDATE)   # llhttp now expects a body
            drill = r.drill
        hp = proxy.health_path
        if hp and head.startswith(hp, target) and head[target + len(hp)] in b" ?":
            return self._health(method, rest, length, chunked)
        if proxy.edge is not None and not self.https:   # ACME token, redirect to https (proxy/tls.py)
            answer = proxy.edge(self, method, head, target)
            if answer is not None:
                return self._answer(answer, rest, length, chunked)
        slot = proxy.live_slot
        site: Routable = proxy
        if proxy.sites is not None:        # host routing: the Host header picks the site (proxy/routes.py)
            found = proxy.sites.lookup(head)
            if found is None:
                return self.reject(404)    # no project serves that host name
            site = found
            slot = site.live_slot
        self.req_drill = False
        if drill:                          # X-Changeover-Drill: only its own token opens the route
            ds = site.drill_match(drill)
            if ds is not None:
                slot = ds
                self.req_drill = True
        if site.gate is not None and not self.req_drill:    # paused or in maintenance (proxy/hold.py)
            return site.gate.admit(self, method, out, rest, length, chunked)
        self._route(method, out, rest, length, chunked, slot)

    def _health(self, method: bytes, rest: bytes, length: int, chunked: bool) -> None:
        """The load balancer's health check: answered here, never forwarded, not recorded."""
        if method != b"GET" and method != b"HEAD":
            return self.reject(405)
        if length or chunked:
            self.req_keep = False          # its body is not read: the connection ends
        elif rest:
            self.buf += rest
        close = not self.req_keep or self.proxy.retiring
        self.transport.write(self.proxy.health_response(self.req_head_only, close))
        if close:
            return self._close()
        self.state = S_WAIT
        self.dkind = D_NONE
        self.proxy.loop.call_soon(self._resume)

    def _answer(self, data: bytes, rest: bytes, length: int, chunked: bool) -> None:
        """A response the proxy makes itself (`proxy.edge`), keep-alive as for the health check."""
        end = data.find(b"\r\n\r\n")
        closing = b"\r\nconnection: close" in data[:end].lower()
        if length or chunked or closing:
            self.req_keep = False          # a body is not read: the connection ends
        elif rest:
            self.buf += rest
        close = not self.req_keep or self.proxy.retiring
        if close and not closing:
            data = data[:end] + b"\r\nConnection: close" + data[end:]
        self.transport.write(data)
        if close:
            return self._close()
        self.state = S_WAIT
        self.dkind = D_NONE
        self.proxy.loop.call_soon(self._resume)

    def _wait_head(self, keep: bytes) -> None:
        """Only empty lines so far: the head timeout runs from now, whatever came before."""
        if keep:
            self._partial(keep)
        elif self.dkind == D_IDLE:
            self.dkind = D_HEAD
            self.deadline = self.proxy.now + self.proxy.settings.header_timeout

    def _partial(self, data: bytes) -> None:
        """The first part of a head: buffer it, and from now on scan only what arrives."""
        proxy = self.proxy
        if len(data) > proxy.settings.max_header_bytes:
            return self._too_big(data)
        if data.count(b"\n") != data.count(b"\r\n"):
            return self.reject(400)        # bare LF: llhttp would refuse it, don't wait for more
        if not self.partial:
            n = proxy.partial_heads.get(self.ip, 0)
            if n >= MAX_PARTIAL_HEADS_PER_CLIENT and not self.trusted:
                return self.reject(429)    # one address holding this many unfinished heads: slowloris
            proxy.partial_heads[self.ip] = n + 1
            self.partial = True
        proxy.head_bytes_scanned += len(data)
        self.buf += data
        if self.dkind == D_IDLE:
            self.dkind = D_HEAD
            self.deadline = proxy.now + proxy.settings.header_timeout

    def _head_more(self, data: bytes) -> None:
        """More of an unfinished head: only the new bytes are scanned (and the 3 before them, for
        a terminator split across reads), nothing is copied until the head is complete, so a
        client dripping a byte at a time costs what it sends, not what it sent before."""
        buf = self.buf
        start = len(buf)
        buf += data
        if buf[0] == 13:                   # only a CR of an empty line so far: start over
            whole = bytes(buf)
            buf.clear()
            if self.partial:
                self.head_finished()
            return self._head(whole)
        proxy = self.proxy
        proxy.head_bytes_scanned += len(data) + 3
        end = buf.find(b"\r\n\r\n", max(0, start - 3))
        if end < 0:
            limit = proxy.settings.max_header_bytes
            if len(buf) > limit:
                return self._too_big(buf)
            if buf.count(b"\n", start) != buf.count(b"\r\n", max(0, start - 1)):
                return self.reject(400)    # bare LF
            return
        whole = bytes(buf)                 # the one copy of the head, now that it is complete
        buf.clear()
        if self.partial:
            self.head_finished()
        self._head(whole)

    def _too_big(self, data: bytes | bytearray) -> None:
        """Past max_header_bytes: 414 when the request line alone is that long, else 431."""
        lf = data.find(b"\n")
        self.reject(414 if lf < 0 or lf >= self.proxy.settings.max_header_bytes else 431)

    def _route(self, method: bytes, out: bytes, rest: bytes, length: int, chunked: bool,
               slot: UpstreamPool | None, t0: float = 0.0) -> None:
        proxy = self.proxy
        self.resp_started = self.resp_close = self.upstream_failed = False
        self.attempts = 0
        if slot is None or not slot.upstreams:
            if length or chunked:
                self.req_keep = False
            elif rest:
                self.buf += rest
            proxy.record("" if slot is None else slot.name, 503, 0.0, False)
            return self._write_error(503)
        if self.req_drill and not t0 and (proxy.drill_status or proxy.drill_delay):
            return self._drill_fault(method, out, rest, length, chunked, slot)
        self.req_t0 = t0 or perf()
        self.req_seq += 1
        self.req_slot = slot
        slot.inflight += 1
        self.req_out = out
        self.req_replayable = not (length or chunked) and method in REPLAYABLE
        part = rest
        end = 0
        self.body_remaining = 0
        if chunked:
            self.body_chunked = True
            self.scanner = ChunkScanner(proxy.settings.max_body_bytes)
            try:
                end = self.scanner.feed(rest)
            except HttpError as e:
                return self._body_error(e.status)
            if end >= 0:
                part, rest = rest[:end], rest[end:]
            else:
                rest = b""
        else:
            self.body_chunked = False
            self.body_remaining = length - min(length, len(rest))
            if length:
                part, rest = rest[:length], rest[length:]
            else:
                part = b""
        if self.body_remaining or (chunked and end < 0):
            self.state = S_BODY
            self.dkind = D_BODY
            self.deadline = proxy.now + proxy.settings.body_timeout
        else:
            self.state = S_WAIT
            self.dkind = D_RESPONSE
            self.deadline = proxy.now + proxy.settings.response_timeout
        if rest:
            self.buf += rest
            self.pause(P_PIPELINE)
        upstream = slot.pick()
        idle = upstream.idle
        while idle:
            conn = idle.pop()
            # a request that cannot be replayed only gets a recently used connection: the app
            # may be closing one that sat idle longer, and then the request would fail
            if self.req_replayable or proxy.now - conn.idle_since < SAFE_REUSE_IDLE:
                conn.attach(self)
                self.up = conn
                conn.transport.write(out + part if part else out)
                return
            conn.transport.close()
        else:
            self.pending = [out, part] if part else [out]
            self.pending_size = len(part)
            self._connect(upstream)

    def _drill_fault(self, method: bytes, out: bytes, rest: bytes, length: int, chunked: bool,
                     slot: UpstreamPool) -> None:
        """The fault set on the drill route: an error answered here, or the request held back
        (reading paused) and forwarded after the delay; recorded against the drill slot."""
        proxy = self.proxy
        if proxy.drill_status:
            if length or chunked:
                self.req_keep = False
            elif rest:
                self.buf += rest
            proxy.record(slot.name, proxy.drill_status, 0.0, False, out)
            return self._write_error(proxy.drill_status)
        t0 = perf()
        self.pause(P_DELAY)
        self.state = S_WAIT
        self.dkind = D_NONE

        def forward() -> None:
            self.unpause(P_DELAY)
            if self.closed:
                return
            self._route(method, out, rest, length, chunked, proxy.drill_slot or slot, t0)

        proxy.loop.call_later(proxy.drill_delay, forward)

    # -- request body ------------------------------------------------------------------------
    def _body(self, data: bytes) -> None:
        proxy = self.proxy
        self.deadline = proxy.now + proxy.settings.body_timeout
        if self.body_chunked:
            assert self.scanner is not None
            try:
                end = self.scanner.feed(data)
            except HttpError as e:
                return self._body_error(e.status)
            if end < 0:
                return self._send(data)
        else:
            end = self.body_remaining
            if len(data) < end:
                self.body_remaining -= len(data)
                return self._send(data)
            self.body_remaining = 0
        self._send(data[:end] if end < len(data) else data)
        if end < len(data):
            self.buf += data[end:]
            self.pause(P_PIPELINE)
        self.state = S_WAIT
        self.dkind = D_RESPONSE
        self.deadline = proxy.now + proxy.settings.response_timeout

    def _send(self, data: bytes) -> None:
        up = self.up
        if up is not None:
            up.transport.write(data)
        else:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > MAX_PENDING:
                self.pause(P_CONNECT)

    def _body_error(self, status: int) -> None:
        """Bad framing or too large mid-body: the upstream exchange cannot be finished."""
        up, self.up = self.up, None
        if up is not None:
            up.client = None
            up.transport.close()
        self.req_keep = False
        self._finish_request(status, False)
        if not self.resp_started:
            self.transport.write(error_response(status, True, self.req_head_only))
        self._close()
