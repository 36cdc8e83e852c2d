"""The per-request life of a client connection in the embedded proxy: how an exchange ends.

`Exchange` holds a client connection's state and everything that finishes a request: the
response head for the client, completion and keep-alive, upstream connects and retries, 502/504,
timeouts and drain. `client.ClientConn` adds the reading side (request heads and bodies) on top.
Timeouts are deadlines checked by the proxy's sweeper, so the hot path only stores a float.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from changeover.proxy import deadlines, tunnel
from changeover.proxy.http1 import ChunkScanner, error_response
from changeover.proxy.states import (
    D_BODY,
    D_HEAD,
    D_IDLE,
    D_NONE,
    P_CONNECT,
    P_HOLD,
    P_PIPELINE,
    P_UPSTREAM,
    S_BODY,
    S_CLOSED,
    S_HEAD,
    S_TUNNEL,
    S_WAIT,
    WS_CUT_WAIT,
    perf,
)
from changeover.proxy.upstream import Upstream, UpstreamConn, UpstreamPool
from changeover.proxy.websocket import FrameTracker

if TYPE_CHECKING:
    from changeover.proxy.embedded import EmbeddedProxy

# what client.py, hold.py and embedded.py take from here (the states are states.py's)
__all__ = ["D_HEAD", "D_IDLE", "D_NONE", "MAX_PENDING", "P_HOLD", "REPLAYABLE", "SAFE_REUSE_IDLE", "S_HEAD",
           "S_TUNNEL", "S_WAIT", "VALIDATE", "WS_CUT_WAIT", "Exchange"]
MAX_PENDING = 256 * 1024
SAFE_REUSE_IDLE = 1.0
REPLAYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
log = logging.getLogger("changeover.proxy")


class _Validate:
    """llhttp only validates here; heads are read from the raw bytes (no per-header callbacks)."""


VALIDATE = _Validate()


class Exchange(asyncio.Protocol):
    __slots__ = ("attempts", "body_chunked", "body_remaining", "buf", "closed", "deadline", "dkind", "fwd",
                 "ip", "parser", "partial", "pending", "pending_size", "proxy", "req_drill", "req_head_only",
                 "req_http11", "req_keep", "req_line", "req_out", "req_replayable", "req_seq", "req_slot", "req_t0",
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
        self.req_line = b""
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
        if self.tun_cut and tunnel.closed_after_cut(self):
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
        """The response is complete: the app connection goes back to the pool, the request is
        recorded, and the client connection waits for its next request (or closes)."""
        if self.state == S_BODY:           # answered before the whole body was sent: cut both
            reusable = False
            self.resp_close = True
        self.up = None
        proxy = self.proxy
        up.release(reusable, proxy.now)
        # _finish_request() and _next(), as one call on the hot path
        slot, self.req_slot = self.req_slot, None
        if slot is not None:
            rec = proxy.recorder
            if rec is not None:
                try:
                    rec.record(slot.name, up.status, perf() - self.req_t0, self.upstream_failed, self.req_line)
                except Exception:          # a monitor bug must never break traffic
                    log.exception("request recorder failed")
            slot.inflight -= 1
            if not slot.inflight and slot.waiters:
                slot.done_one_wake()
        if self.resp_close:
            return self._close()
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

    # -- tunnels (after a 101): the relaying here, the rest in tunnel.py --------------------------
    def tunnel_open(self, up: UpstreamConn) -> None:
        tunnel.open_tunnel(self, up)

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
            tunnel.cut_feed(self, ws, data, up.transport, True)

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
            tunnel.cut_feed(self, ws, data, self.transport, False)

    def tunnel_limit(self, limit: float) -> None:
        """The drain limit: at `limit` (loop time) the tunnel is cut, 1001 for a WebSocket."""
        tunnel.set_limit(self, limit)

    def tunnel_cut(self, why: str, wait: bool = True) -> None:
        """End a tunnel the proxy may not keep open (tunnel.cut)."""
        tunnel.cut(self, why, wait)

    @property
    def cut_pending(self) -> bool:
        """Being cut and still waiting for a frame to end before its close frame can go."""
        return tunnel.cut_pending(self)

    def _finish_request(self, status: int, failed: bool) -> None:
        slot, self.req_slot = self.req_slot, None
        if slot is not None:
            if self.state != S_TUNNEL and self.proxy.recorder is not None:
                self.proxy.record(slot.name, status, perf() - self.req_t0, failed, self.req_line)
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

    # -- timeouts and drain (deadlines.py) --------------------------------------------------------
    def timeout(self, now: float) -> None:
        """The sweeper found this connection's deadline passed."""
        deadlines.expired(self, now)

    def drain_abort(self, why: str = "drain timeout") -> None:
        """Drain timeout: whatever is still open to the draining slot is closed now (a WebSocket
        tunnel with 1001)."""
        deadlines.drain_abort(self, why)

    def retire_abort(self) -> None:
        """Retire timeout: a request still unanswered gets a 504, anything else is closed."""
        deadlines.retire_abort(self)

    # -- the reading side ------------------------------------------------------------------------
    def _head(self, data: bytes) -> None:
        """Parse the next request head: `ClientConn` overrides this (`_next()` calls it)."""
        raise NotImplementedError("ClientConn implements the reading side")
