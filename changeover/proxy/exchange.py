"""The per-request life of a client connection in the embedded proxy: how an exchange ends.

`Exchange` holds a client connection's state and everything that finishes a request: the
response head for the client, completion and keep-alive, upstream connects and retries, 502/504,
timeouts and drain. `client.ClientConn` adds the reading side (request heads and bodies) on top.
Timeouts are deadlines checked by the proxy's sweeper, so the hot path only stores a float.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

import httptools

from changeover.proxy.http1 import ChunkScanner, error_response
from changeover.proxy.upstream import Upstream, UpstreamConn, UpstreamPool
from changeover.proxy.websocket import SENT_CLOSE, SENT_NOTHING, FrameTracker, close_frame

if TYPE_CHECKING:
    from changeover.proxy.embedded import EmbeddedProxy

# client states
S_HEAD, S_BODY, S_WAIT, S_TUNNEL, S_CLOSED = range(5)
# deadline kinds, checked by the sweeper (D_TUNNEL: idle timeout or drain limit of a tunnel;
# D_CUT: a WebSocket tunnel being closed waits for its frames to end)
D_NONE, D_HEAD, D_IDLE, D_BODY, D_RESPONSE, D_TUNNEL, D_CUT = range(7)
# reasons to pause reading from the client (bit mask)
P_PIPELINE, P_UPSTREAM, P_CONNECT, P_DELAY = 1, 2, 4, 8   # P_DELAY: a drill fault holds the request
P_HOLD = 16                        # a pause holds the request (proxy/hold.py)
MAX_PENDING = 256 * 1024
SAFE_REUSE_IDLE = 1.0
REPLAYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
perf = time.perf_counter
# how long a WebSocket tunnel being cut waits for a frame still being relayed to end, so that the
# close frame goes in at a frame boundary; past it the tunnel is closed without one
WS_CUT_WAIT = 1.0
WS_UPGRADE = re.compile(rb"\r\nupgrade:[^\r]*websocket", re.IGNORECASE)
log = logging.getLogger("changeover.proxy")


class _Validate:
    """llhttp only validates here; heads are read from the raw bytes (no per-header callbacks)."""


VALIDATE = _Validate()


class Exchange(asyncio.Protocol):
    __slots__ = ("attempts", "body_chunked", "body_remaining", "buf", "closed", "deadline", "dkind", "fwd",
                 "ip", "parser", "partial", "pending", "pending_size", "proxy", "req_drill", "req_head_only",
                 "req_http11", "req_keep", "req_out", "req_replayable", "req_seq", "req_slot", "req_t0",
                 "req_upgrade", "resp_close", "resp_started", "resp_status", "rpause", "scanner", "state", "transport",
                 "trusted", "tun_active", "tun_cut", "tun_limit", "up", "upstream_failed", "wpaused", "ws_in",
                 "ws_out")

    transport: asyncio.Transport

    def __init__(self, proxy: EmbeddedProxy) -> None:
        self.proxy = proxy
        self.buf = bytearray()
        self.parser = httptools.HttpRequestParser(VALIDATE)
        self.state = S_HEAD
        self.dkind = D_HEAD
        self.deadline = proxy.now + proxy.settings.header_timeout
        self.rpause = 0
        self.wpaused = False
        self.closed = False
        self.up: UpstreamConn | None = None
        self.req_slot: UpstreamPool | None = None
        self.req_seq = 0
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.scanner: ChunkScanner | None = None
        self.req_t0 = 0.0
        self.req_out = b""
        self.req_keep = self.req_http11 = True
        self.req_drill = False             # on the drill route: the response names its slot
        self.req_head_only = self.req_upgrade = self.req_replayable = False
        self.body_remaining = 0
        self.body_chunked = False
        self.resp_started = self.resp_close = self.upstream_failed = False
        self.resp_status = 0
        self.attempts = 0
        self.ip = b""
        self.fwd = b""
        self.trusted = False               # the peer is in [proxy] trusted_proxies
        self.partial = False               # counted in proxy.partial_heads (a head is unfinished)
        # tunnels (after a 101): last byte either way (sweeper clock), the drain limit (0: none),
        # why it is being cut, and for a WebSocket the frame boundaries each way (None: not one)
        self.tun_active = self.tun_limit = 0.0
        self.tun_cut = ""
        self.ws_in: FrameTracker | None = None   # client -> app
        self.ws_out: FrameTracker | None = None  # app -> client

    # -- asyncio callbacks shared by both sides ---------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.dkind = D_NONE
        self.proxy.clients.discard(self)
        if self.partial:
            self.head_finished()
        up, self.up = self.up, None
        if up is not None:
            up.client = None
            up.transport.close()
        if self.req_slot is not None:
            # the client went away mid-request (often: the app was too slow for it); recorded as
            # 499 like nginx does, so the monitor sees it without counting it as an app error
            self._finish_request(self.resp_status if self.resp_started else 499, False)
        self.state = S_CLOSED

    def pause_writing(self) -> None:
        self.wpaused = True
        up = self.up
        if up is not None and not up.paused:
            up.paused = True
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.wpaused = False
        up = self.up
        if up is not None and up.paused:
            up.paused = False
            up.transport.resume_reading()
            if self.state != S_TUNNEL:     # a tunnel's deadline is its idle timeout or drain limit
                self.deadline = self.proxy.now + self.proxy.settings.response_timeout

    def pause(self, reason: int) -> None:
        if not self.rpause and not self.closed:
            self.transport.pause_reading()
        self.rpause |= reason

    def unpause(self, reason: int) -> None:
        if self.rpause & reason:
            self.rpause &= ~reason
            if not self.rpause and not self.closed:
                self.transport.resume_reading()
                if self.dkind == D_BODY:
                    self.deadline = self.proxy.now + self.proxy.settings.body_timeout

    # -- upstream connections ----------------------------------------------------------------
    def _connect(self, upstream: Upstream) -> None:
        self.up = None
        task = self.proxy.loop.create_task(self._connect_task(upstream, self.req_seq))
        self.proxy.tasks.add(task)         # the loop only keeps weak references to tasks
        task.add_done_callback(self.proxy.tasks.discard)

    async def _connect_task(self, upstream: Upstream, seq: int) -> None:
        proxy = self.proxy
        try:
            async with asyncio.timeout(proxy.settings.connect_timeout):
                _, conn = await proxy.loop.create_connection(
                    lambda: UpstreamConn(upstream), upstream.host, upstream.port)
        except (OSError, TimeoutError):
            if self.req_seq == seq and not self.closed and self.req_slot is not None:
                self._retry_or_fail(502)
            return
        if self.req_seq != seq or self.closed or self.req_slot is None:
            conn.release(True, proxy.now)  # the request went away meanwhile: keep the connection
            return
        conn.attach(self)
        self.up = conn
        pending, self.pending = self.pending, []
        self.pending_size = 0
        conn.transport.write(b"".join(pending))
        self.unpause(P_CONNECT)

    def _retry_or_fail(self, status: int) -> None:
        slot = self.req_slot
        if slot is not None and slot.upstreams and self.attempts < self.proxy.settings.retries:
            self.attempts += 1
            self._connect(slot.pick())     # a fresh connection: pooled ones may be stale too
            return
        self.upstream_failed = True
        self.upstream_error(status)

    def upstream_lost(self, up: UpstreamConn) -> None:
        """The upstream connection closed before its response completed."""
        if self.up is up:
            self.up = None
        ins, out = self.ws_in, self.ws_out
        if self.tun_cut and self.state == S_TUNNEL and ins is not None and out is not None \
                and ins.sent == SENT_CLOSE and out.sent == SENT_CLOSE and self.dkind == D_CUT:
            return                         # the app closed after 1001, as it should: the client is next
        if not up.got_bytes and up.reused and self.req_replayable and not self.resp_started:
            self.pending = [self.req_out]  # stale keep-alive connection: nothing was processed
            self.pending_size = 0
            return self._retry_or_fail(502)
        self.upstream_failed = True
        self.upstream_error(502)

    def upstream_error(self, status: int) -> None:
        """502/504: answer if the client has seen nothing of the response yet, else cut it."""
        up, self.up = self.up, None
        if up is not None:
            up.client = None
            up.transport.close()
        if self.state == S_TUNNEL or self.resp_started:
            self._finish_request(self.resp_status, True)   # what the client saw, cut short
            return self._close()
        if self.state == S_BODY:
            self.req_keep = False
        self._finish_request(status, True)
        self._write_error(status)

    # -- responses -----------------------------------------------------------------------------
    def response_head(self, head: bytes, close_delimited: bool) -> bytes:
        """The client's copy of a response head (`head` ends with the last header's CRLF)."""
        self.resp_started = True
        if self.req_drill and self.req_slot is not None:
            head += b"X-Changeover-Slot: " + self.req_slot.name.encode() + b"\r\n"
        if close_delimited or not self.req_keep or self.state == S_BODY or self.proxy.retiring:
            self.resp_close = True
            return head + b"Connection: close\r\nVia: 1.1 changeover\r\n\r\n"
        if not self.req_http11:
            return head + b"Connection: keep-alive\r\nVia: 1.1 changeover\r\n\r\n"
        return head + b"Via: 1.1 changeover\r\n\r\n"

    def response_done(self, up: UpstreamConn, reusable: bool) -> None:
        if self.state == S_BODY:           # answered before the whole body was sent: cut both
            reusable = False
            self.resp_close = True
        self.up = None
        up.release(reusable, self.proxy.now)
        self._finish_request(up.status, self.upstream_failed)
        if self.resp_close:
            return self._close()
        self._next()

    def tunnel_open(self, up: UpstreamConn) -> None:
        """101: from now on bytes are relayed both ways until one side closes (or the proxy ends the
        tunnel: `tunnel_cut`)."""
        proxy = self.proxy
        self.state = S_TUNNEL
        self.tun_active = proxy.now
        idle = proxy.settings.tunnel_idle_timeout
        self.dkind = D_TUNNEL if idle else D_NONE
        self.deadline = proxy.now + idle
        if WS_UPGRADE.search(self.req_out) is not None:
            self.ws_in, self.ws_out = FrameTracker(), FrameTracker()
        proxy.record(self.req_slot.name if self.req_slot else "", 101, perf() - self.req_t0,
                     self.upstream_failed, self.req_out)
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self.tunnel_in(data)
        self.unpause(P_PIPELINE)

    # -- tunnels: relaying, limits, and the close ------------------------------------------------
    def tunnel_in(self, data: bytes) -> None:
        """Client bytes for the app, on a WebSocket tunnel (plain ones write straight through)."""
        up = self.up
        ws = self.ws_in
        if up is None:
            return
        if ws is None:
            up.transport.write(data)
        elif not self.tun_cut:
            ws.feed(data)
            up.transport.write(data)
        else:
            self._cut_feed(ws, data, up.transport, True)

    def tunnel_out(self, data: bytes) -> None:
        """App bytes for the client on a tunnel (called by the upstream connection)."""
        self.tun_active = self.proxy.now
        ws = self.ws_out
        if ws is None:
            self.transport.write(data)
        elif not self.tun_cut:
            ws.feed(data)
            self.transport.write(data)
        else:
            self._cut_feed(ws, data, self.transport, False)

    def tunnel_limit(self, limit: float) -> None:
        """The drain limit: at `limit` (loop time) the tunnel is cut, 1001 for a WebSocket."""
        if self.state != S_TUNNEL or self.tun_cut:
            return
        if not self.tun_limit or limit < self.tun_limit:
            self.tun_limit = limit
        if self.dkind != D_TUNNEL or limit < self.deadline:
            self.dkind = D_TUNNEL
            self.deadline = limit

    def tunnel_cut(self, why: str, wait: bool = True) -> None:
        """End a tunnel the proxy may not keep open (`why`: drain limit, retire timeout, idle,
        shutdown). A WebSocket gets a close frame 1001 (going away) both ways, each at a frame
        boundary: a frame still being relayed is given WS_CUT_WAIT to end (none with `wait`
        False), then the tunnel closes without a close frame that way (logged)."""
        if self.closed:
            return
        if self.ws_in is None or self.ws_out is None or self.up is None:
            return self._end_tunnel()
        if not self.tun_cut:
            self.tun_cut = why
            self.dkind = D_CUT
            self.deadline = self.proxy.now + WS_CUT_WAIT
            self._cut_feed(self.ws_out, b"", self.transport, False)
            if not self.closed and self.up is not None:
                self._cut_feed(self.ws_in, b"", self.up.transport, True)
        if not wait and not self.closed:
            self._cut_overdue()

    def _cut_feed(self, ws: FrameTracker, data: bytes, transport: asyncio.Transport, masked: bool) -> None:
        """Relay `data` up to the next frame boundary, then the close frame; nothing after it."""
        if ws.sent:
            return                         # that way is ended: what still comes is dropped
        if ws.broken:
            ws.sent = SENT_NOTHING         # not frames the proxy can follow: no close frame
        else:
            k = ws.feed(data, stop=True)
            if k < 0:
                if data:
                    transport.write(data)
                return
            if k:
                transport.write(data[:k])
            if not ws.closed:              # a close frame already went that way: no second one
                transport.write(close_frame(masked=masked))
            ws.sent = SENT_CLOSE
        ins, out = self.ws_in, self.ws_out
        if ins is not None and out is not None and ins.sent and out.sent:
            if ins.sent == SENT_CLOSE and out.sent == SENT_CLOSE:
                log.info("WebSocket tunnel closed with 1001 (going away): %s", self.tun_cut)
                return self._wind_down()
            self._log_unframed()
            self._end_tunnel()

    @property
    def cut_pending(self) -> bool:
        """Being cut and still waiting for a frame to end before its close frame can go."""
        return self.dkind == D_CUT and any(ws is not None and not ws.sent for ws in (self.ws_in, self.ws_out))

    def _wind_down(self) -> None:
        """Both close frames are out: a FIN follows each, and the peers answer theirs and close (the
        closing handshake, RFC 6455 §7.1.1) within WS_CUT_WAIT; closing at once would answer their
        close frames with a reset. A transport without half-close (TLS) is closed now."""
        if not self.transport.can_write_eof():
            return self._end_tunnel()
        self.dkind = D_CUT
        self.deadline = self.proxy.now + WS_CUT_WAIT
        self.transport.write_eof()
        up = self.up
        if up is not None and up.transport.can_write_eof():
            up.transport.write_eof()

    def _cut_overdue(self) -> None:
        """WS_CUT_WAIT is over: a peer did not close after the closing handshake (closed now), or
        a frame is still being relayed (closed without a close frame that way, logged)."""
        ways = [ws for ws in (self.ws_in, self.ws_out) if ws is not None]
        if ways and all(ws.sent for ws in ways):
            return self._end_tunnel()
        for ws in ways:
            if not ws.sent:
                ws.sent = SENT_NOTHING
        self._log_unframed()
        self._end_tunnel()

    def _log_unframed(self) -> None:
        ways = [name for name, ws in (("to the client", self.ws_out), ("to the app", self.ws_in))
                if ws is not None and ws.sent == SENT_NOTHING]
        log.warning("WebSocket tunnel closed (%s) without a close frame %s: a frame was still being relayed, "
                    "or the stream was not frames the proxy can follow", self.tun_cut, " or ".join(ways))

    def _end_tunnel(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.client = None
            up.transport.close()
        self._finish_request(self.resp_status, False)
        self._close()

    def _tunnel_timeout(self, now: float) -> None:
        limit = self.tun_limit
        idle = self.proxy.settings.tunnel_idle_timeout
        if limit and now >= limit:
            return self.tunnel_cut("drain limit")
        if idle and now - self.tun_active >= idle:
            return self.tunnel_cut(f"no bytes either way for {idle:g}s (tunnel_idle_timeout)")
        nxt = self.tun_active + idle if idle else 0.0
        if limit and (not nxt or limit < nxt):
            nxt = limit
        self.deadline = nxt
        self.dkind = D_TUNNEL if nxt else D_NONE

    def _finish_request(self, status: int, failed: bool) -> None:
        slot, self.req_slot = self.req_slot, None
        if slot is not None:
            if self.state != S_TUNNEL and self.proxy.recorder is not None:
                self.proxy.record(slot.name, status, perf() - self.req_t0, failed, self.req_out)
            slot.inflight -= 1
            if not slot.inflight and slot.waiters:
                slot.done_one_wake()

    def _next(self) -> None:
        """Ready for the next request on this keep-alive connection."""
        proxy = self.proxy
        self.state = S_HEAD
        self.dkind = D_IDLE
        self.deadline = proxy.now + proxy.settings.idle_timeout
        if self.rpause & (P_UPSTREAM | P_CONNECT):
            self.unpause(P_UPSTREAM | P_CONNECT)   # that exchange is over: its back-pressure too
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self.unpause(P_PIPELINE)
            self._head(data)

    def _write_error(self, status: int) -> None:
        close = not self.req_keep or self.proxy.retiring
        self.transport.write(error_response(status, close, self.req_head_only))
        if close:
            return self._close()
        # next request from the next loop turn: a pipelined burst must not recurse
        self.state = S_WAIT
        self.dkind = D_NONE
        self.proxy.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if not self.closed and self.state == S_WAIT and self.req_slot is None:
            self._next()

    def reject(self, status: int) -> None:
        """A request we refuse before it is routed: it never reaches the app."""
        self.transport.write(error_response(status, True))
        self._close()

    def abort(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.client = None
            up.transport.close()
        self._finish_request(502, True)
        self._close()

    def _close(self) -> None:
        self.state = S_CLOSED
        self.dkind = D_NONE
        if self.partial:
            self.head_finished()
        if not self.closed:
            self.closed = True
            self.transport.close()
            self.proxy.clients.discard(self)

    def head_finished(self) -> None:
        """This connection no longer holds an unfinished head (see MAX_PARTIAL_HEADS_PER_CLIENT)."""
        self.partial = False
        counts = self.proxy.partial_heads
        n = counts.get(self.ip, 0) - 1
        if n > 0:
            counts[self.ip] = n
        else:
            counts.pop(self.ip, None)

    # -- timeouts and drain ----------------------------------------------------------------------
    def timeout(self, now: float) -> None:
        kind = self.dkind
        if kind == D_TUNNEL:
            return self._tunnel_timeout(now)
        if kind == D_CUT:
            return self._cut_overdue()
        if kind == D_IDLE or (kind == D_HEAD and not self.buf):
            self._close()                  # nothing started: close quietly
        elif kind == D_HEAD:
            self.reject(408)
        elif kind == D_BODY:
            if self.rpause:                # we stopped reading: not the client's fault
                self.deadline = now + self.proxy.settings.body_timeout
                return
            self.req_keep = False
            up, self.up = self.up, None
            if up is not None:
                up.client = None
                up.transport.close()
            self._finish_request(408, False)
            if not self.resp_started:
                self.transport.write(error_response(408, True, self.req_head_only))
            self._close()
        elif kind == D_RESPONSE:
            up = self.up
            if up is not None and up.paused:
                # the client has read nothing for a whole response timeout: it holds an app
                # connection for nothing, let both go
                self.up = None
                up.client = None
                up.transport.close()
                self._finish_request(self.resp_status, False)
                return self._close()
            self.upstream_error(504)

    def drain_abort(self, why: str = "drain timeout") -> None:
        """Drain timeout: whatever is still open to the draining slot is closed now (a WebSocket
        tunnel with 1001)."""
        if self.state == S_TUNNEL:
            self.tunnel_cut(why)
        elif self.resp_started:
            up, self.up = self.up, None
            if up is not None:
                up.client = None
                up.transport.close()
            self._finish_request(self.resp_status, False)
            self._close()
        else:
            self.req_keep = False
            self.upstream_error(504)

    def retire_abort(self) -> None:
        """Retire timeout: a request still unanswered gets a 504, anything else is closed."""
        if self.req_slot is not None or self.state == S_TUNNEL:
            self.drain_abort("retire timeout")
        else:
            self._close()

    # -- the reading side ------------------------------------------------------------------------
    def _head(self, data: bytes) -> None:
        """Parse the next request head: `ClientConn` overrides this (`_next()` calls it)."""
        raise NotImplementedError("ClientConn implements the reading side")
