"""The client side of the embedded proxy: one `ClientConn` per accepted connection.

Per request: the head is validated by llhttp, rewritten once (`http1`), routed to the slot that is
live *at that moment* and written to a pooled upstream connection straight from this callback (no
task, no coroutine); a head seen before is not parsed again (`_SEEN`). Request bodies stream
through with flow control (`reader.py`, with unfinished heads and the proxy's own answers); the
response comes back through `UpstreamConn`, which calls `response_done()` (`exchange.py` holds how
an exchange ends).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from changeover.proxy.exchange import REPLAYABLE, SAFE_REUSE_IDLE, VALIDATE
from changeover.proxy.http1 import (
    HOST,
    REQ_SPECIAL,
    ChunkScanner,
    HttpError,
    origin_form,
    rewrite_request,
)
from changeover.proxy.reader import MAX_PARTIAL_HEADS_PER_CLIENT as MAX_PARTIAL_HEADS_PER_CLIENT  # the tests'
from changeover.proxy.reader import Reader
from changeover.proxy.states import (
    D_BODY,
    D_NONE,
    D_RESPONSE,
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

# Outcomes of request heads accepted before, by their bytes: clients send the same head over and
# over (a keep-alive client, a poller, a load balancer's check), and for a plain bodiless head
# (none of REQ_SPECIAL's headers) everything _parse() learns depends on those bytes alone: llhttp's
# verdict, the method, HTTP/1.0 or 1.1, the Host and the head rewritten for the app, all but this
# connection's forwarding headers. Never kept: a head with a body, framing or forwarding headers,
# an upgrade, or one refused. Bounded like upstream._HEADS (cleared when full).
_SEEN: dict[bytes, tuple[bytes, int, bytes, bytes, bytes, bool]] = {}
_SEEN_MAX = 256
_SEEN_KEY_MAX = 4096                  # larger heads are parsed every time (at most ~3 MB kept)


class ClientConn(Reader):
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
        in one read, handled without a copy, and one seen before is not parsed again."""
        proxy = self.proxy
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
        # one call (partition takes one argument, find's are parsed); `key`: the head without its blank line
        key, blank, rest = data.partition(b"\r\n\r\n")
        if not blank:
            return self._partial(data)
        if len(key) + 4 > proxy.settings.max_header_bytes:
            return self._too_big(data)
        seen = _SEEN.get(key)
        if seen is not None:
            # the same bytes as a head accepted before (see _SEEN): only this connection's
            # forwarding headers differ
            method, target, head, pre, post, http11 = seen
            out = pre + self.fwd + post
            line = pre                     # what is recorded: a shared object, its hash kept
            self.req_http11 = self.req_keep = http11
            self.req_upgrade = False
            length = 0
            chunked = False
            drill = b""
        else:
            head = key + blank
            parsed = self._parse(head)
            if parsed is None:
                return
            method, target, head, out, length, chunked, drill = parsed
            line = out
        self.req_head_only = method == b"HEAD"
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
        self._route(method, out, rest, length, chunked, slot, 0.0, line)

    def _parse(self, head: bytes) -> tuple[bytes, int, bytes, bytes, int, bool, bytes] | None:
        """A head not seen before: validated and rewritten into (method, target offset, head,
        upstream head, Content-Length, chunked, drill token); None when it was refused. A plain
        bodiless head's outcome is kept in _SEEN."""
        settings = self.proxy.settings
        upgrade = False
        try:
            self.parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError:
            self.reject(400)
            return None
        # llhttp checked the method and the target's bytes but also reads `GET /HTTP/1.1` and
        # `GET /w<LF>X: y HTTP/1.1` as HTTP/0.9 and lets `GET /  HTTP/1.1` pass: the app may read
        # those differently (a desync). So the line must be exactly `method SP target SP
        # HTTP/1.x CRLF`: its first LF ends it after a CR, and the first space after the method
        # is the one before the version.
        key = head
        lf = head.find(b"\n")
        version = head[lf - 10:lf]         # SP HTTP/1.x CR
        if version != b" HTTP/1.1\r" and version != b" HTTP/1.0\r":
            self.reject(505 if version[1:7] == b"HTTP/2" or version[1:7] == b"HTTP/3" else 400)
            return None
        method = self.parser.get_method()
        target = len(method) + 1
        if head.find(b" ", target) != lf - 10:
            self.reject(400)
            return None
        if method == b"CONNECT":
            self.reject(405)
            return None
        if head[target] != 47 and head[target:target + 2] != b"* ":
            try:
                head = origin_form(head)   # absolute-form: the app gets the path, Host from the URI
            except HttpError as e:
                self.reject(e.status)
                return None
        self.req_http11 = http11 = version == b" HTTP/1.1\r"
        self.req_keep = http11
        if REQ_SPECIAL.search(head) is None:
            m = HOST.search(head)
            if m is None:
                if http11:
                    self.reject(400)
                    return None
                post = b"\r\n"
            else:
                if HOST.search(head, m.end() - 2) is not None:
                    self.reject(400)    # two Hosts: which one would the app believe?
                    return None
                post = b"X-Forwarded-Host: " + m.group(1) + b"\r\n\r\n"
            self.req_upgrade = False
            if not upgrade and len(key) <= _SEEN_KEY_MAX:
                if len(_SEEN) >= _SEEN_MAX:
                    _SEEN.clear()
                _SEEN[key[:-4]] = (method, target, head, head[:-2], post, http11)   # by the head without its blank line
            return method, target, head, head[:-2] + self.fwd + post, 0, False, b""
        try:
            r = rewrite_request(head, self.ip, upgrade, http11, self.trusted, self.https)
        except HttpError as e:
            self.reject(e.status)
            return None
        if http11 and HOST.search(head) is None:
            self.reject(400)
            return None
        self.req_keep = r.keep_alive
        self.req_upgrade = r.upgrade
        if r.chunked and not http11:
            self.reject(400)
            return None
        if settings.max_body_bytes and r.length > settings.max_body_bytes:
            self.reject(413)
            return None
        if r.length or r.chunked or upgrade:
            self.parser = httptools.HttpRequestParser(VALIDATE)   # llhttp now expects a body
        return method, target, head, r.out, r.length, r.chunked, r.drill

    def _route(self, method: bytes, out: bytes, rest: bytes, length: int, chunked: bool,
               slot: UpstreamPool | None, t0: float = 0.0, line: bytes = b"") -> None:
        """`line`: the request as the monitor records it (its line picks the route), `out` if
        empty."""
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
        self.req_line = line or out
        part = b""
        if not (length or chunked):        # the common case: no body
            self.req_replayable = method in REPLAYABLE
            self.state = S_WAIT
            self.dkind = D_RESPONSE
            self.deadline = proxy.now + proxy.settings.response_timeout
        else:
            self.req_replayable = False
            end = 0
            self.body_remaining = 0
            self.body_chunked = chunked
            if chunked:
                self.scanner = ChunkScanner(proxy.settings.max_body_bytes)
                try:
                    end = self.scanner.feed(rest)
                except HttpError as e:
                    return self._body_error(e.status)
                if end >= 0:
                    part, rest = rest[:end], rest[end:]
                else:
                    part, rest = rest, b""
            else:
                self.body_remaining = length - min(length, len(rest))
                part, rest = rest[:length], rest[length:]
            if self.body_remaining or end < 0:
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
        ups = slot.upstreams
        upstream = ups[0] if len(ups) == 1 else slot.pick()
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

