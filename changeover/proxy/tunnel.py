"""Tunnels after a 101 in the embedded proxy: opening one, its limits, and how the proxy ends it.

Bytes are relayed both ways by `Exchange.tunnel_in`/`tunnel_out` (the hot part, kept there);
this module holds what happens around them: the idle timeout and the drain limit, and the cut,
where a WebSocket gets a close frame 1001 (going away) each way at a frame boundary.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from changeover.proxy.states import D_CUT, D_NONE, D_TUNNEL, P_PIPELINE, S_TUNNEL, WS_CUT_WAIT, perf
from changeover.proxy.websocket import SENT_CLOSE, SENT_NOTHING, FrameTracker, close_frame

if TYPE_CHECKING:
    from changeover.proxy.exchange import Exchange
    from changeover.proxy.upstream import UpstreamConn

WS_UPGRADE = re.compile(rb"\r\nupgrade:[^\r]*websocket", re.IGNORECASE)
log = logging.getLogger("changeover.proxy")


def open_tunnel(ex: Exchange, up: UpstreamConn) -> None:
    """101: from now on bytes are relayed both ways until one side closes (or the proxy ends the
    tunnel: `cut`)."""
    proxy = ex.proxy
    ex.state = S_TUNNEL
    ex.tun_active = proxy.now
    idle = proxy.settings.tunnel_idle_timeout
    ex.dkind = D_TUNNEL if idle else D_NONE
    ex.deadline = proxy.now + idle
    if WS_UPGRADE.search(ex.req_out) is not None:
        ex.ws_in, ex.ws_out = FrameTracker(), FrameTracker()
    proxy.record(ex.req_slot.name if ex.req_slot else "", 101, perf() - ex.req_t0,
                 ex.upstream_failed, ex.req_line)
    if ex.buf:
        data = bytes(ex.buf)
        ex.buf.clear()
        ex.tunnel_in(data)
    ex.unpause(P_PIPELINE)


def set_limit(ex: Exchange, limit: float) -> None:
    """The drain limit: at `limit` (loop time) the tunnel is cut, 1001 for a WebSocket."""
    if ex.state != S_TUNNEL or ex.tun_cut:
        return
    if not ex.tun_limit or limit < ex.tun_limit:
        ex.tun_limit = limit
    if ex.dkind != D_TUNNEL or limit < ex.deadline:
        ex.dkind = D_TUNNEL
        ex.deadline = limit


def cut(ex: Exchange, why: str, wait: bool = True) -> None:
    """End a tunnel the proxy may not keep open (`why`: drain limit, retire timeout, idle,
    shutdown). A WebSocket gets a close frame 1001 (going away) both ways, each at a frame
    boundary: a frame still being relayed is given WS_CUT_WAIT to end (none with `wait`
    False), then the tunnel closes without a close frame that way (logged)."""
    if ex.closed:
        return
    if ex.ws_in is None or ex.ws_out is None or ex.up is None:
        return end(ex)
    if not ex.tun_cut:
        ex.tun_cut = why
        ex.dkind = D_CUT
        ex.deadline = ex.proxy.now + WS_CUT_WAIT
        cut_feed(ex, ex.ws_out, b"", ex.transport, False)
        if not ex.closed and ex.up is not None:
            cut_feed(ex, ex.ws_in, b"", ex.up.transport, True)
    if not wait and not ex.closed:
        overdue(ex)


def cut_feed(ex: Exchange, ws: FrameTracker, data: bytes, transport: asyncio.Transport, masked: bool) -> None:
    """Relay `data` up to the next frame boundary, then the close frame; nothing after it."""
    if ws.sent:
        return                             # that way is ended: what still comes is dropped
    if ws.broken:
        ws.sent = SENT_NOTHING             # not frames the proxy can follow: no close frame
    else:
        k = ws.feed(data, stop=True)
        if k < 0:
            if data:
                transport.write(data)
            return
        if k:
            transport.write(data[:k])
        if not ws.closed:                  # a close frame already went that way: no second one
            transport.write(close_frame(masked=masked))
        ws.sent = SENT_CLOSE
    ins, out = ex.ws_in, ex.ws_out
    if ins is not None and out is not None and ins.sent and out.sent:
        if ins.sent == SENT_CLOSE and out.sent == SENT_CLOSE:
            log.info("WebSocket tunnel closed with 1001 (going away): %s", ex.tun_cut)
            return _wind_down(ex)
        _log_unframed(ex)
        end(ex)


def cut_pending(ex: Exchange) -> bool:
    """Being cut and still waiting for a frame to end before its close frame can go."""
    return ex.dkind == D_CUT and any(ws is not None and not ws.sent for ws in (ex.ws_in, ex.ws_out))


def closed_after_cut(ex: Exchange) -> bool:
    """The app closed after both close frames went, as it should: the client is next."""
    ins, out = ex.ws_in, ex.ws_out
    return bool(ex.tun_cut) and ex.state == S_TUNNEL and ins is not None and out is not None \
        and ins.sent == SENT_CLOSE and out.sent == SENT_CLOSE and ex.dkind == D_CUT


def _wind_down(ex: Exchange) -> None:
    """Both close frames are out: a FIN follows each, and the peers answer theirs and close (the
    closing handshake, RFC 6455 §7.1.1) within WS_CUT_WAIT; closing at once would answer their
    close frames with a reset. A transport without half-close (TLS) is closed now."""
    if not ex.transport.can_write_eof():
        return end(ex)
    ex.dkind = D_CUT
    ex.deadline = ex.proxy.now + WS_CUT_WAIT
    ex.transport.write_eof()
    up = ex.up
    if up is not None and up.transport.can_write_eof():
        up.transport.write_eof()


def overdue(ex: Exchange) -> None:
    """WS_CUT_WAIT is over: a peer did not close after the closing handshake (closed now), or
    a frame is still being relayed (closed without a close frame that way, logged)."""
    ways = [ws for ws in (ex.ws_in, ex.ws_out) if ws is not None]
    if ways and all(ws.sent for ws in ways):
        return end(ex)
    for ws in ways:
        if not ws.sent:
            ws.sent = SENT_NOTHING
    _log_unframed(ex)
    end(ex)


def _log_unframed(ex: Exchange) -> None:
    ways = [name for name, ws in (("to the client", ex.ws_out), ("to the app", ex.ws_in))
            if ws is not None and ws.sent == SENT_NOTHING]
    log.warning("WebSocket tunnel closed (%s) without a close frame %s: a frame was still being relayed, "
                "or the stream was not frames the proxy can follow", ex.tun_cut, " or ".join(ways))


def end(ex: Exchange) -> None:
    """End the exchange now, both sides: the app's connection is closed, not pooled (a tunnel, or
    a response cut mid-way), and the request is recorded with the status it had."""
    up, ex.up = ex.up, None
    if up is not None:
        up.client = None
        up.transport.close()
    ex._finish_request(ex.resp_status, False)
    ex._close()


def timeout(ex: Exchange, now: float) -> None:
    """The tunnel's deadline passed: the drain limit, the idle timeout, or neither yet."""
    limit = ex.tun_limit
    idle = ex.proxy.settings.tunnel_idle_timeout
    if limit and now >= limit:
        return cut(ex, "drain limit")
    if idle and now - ex.tun_active >= idle:
        return cut(ex, f"no bytes either way for {idle:g}s (tunnel_idle_timeout)")
    nxt = ex.tun_active + idle if idle else 0.0
    if limit and (not nxt or limit < nxt):
        nxt = limit
    ex.deadline = nxt
    ex.dkind = D_TUNNEL if nxt else D_NONE
