"""What the proxy's sweeper does when a client connection's deadline passes, and the drain and
retire timeouts (`EmbeddedProxy.drain`, `retire`): which answer the client still gets (408, 504)
and what is closed. The deadline itself is a float on the connection (exchange.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from changeover.proxy import tunnel
from changeover.proxy.http1 import error_response
from changeover.proxy.states import D_BODY, D_CUT, D_HEAD, D_IDLE, D_RESPONSE, D_TUNNEL, S_TUNNEL

if TYPE_CHECKING:
    from changeover.proxy.exchange import Exchange


def expired(ex: Exchange, now: float) -> None:
    """What a passed deadline means, by its kind (`Exchange.dkind`)."""
    kind = ex.dkind
    if kind == D_TUNNEL:
        return tunnel.timeout(ex, now)
    if kind == D_CUT:
        return tunnel.overdue(ex)
    if kind == D_IDLE or (kind == D_HEAD and not ex.buf):
        ex._close()                    # nothing started: close quietly
    elif kind == D_HEAD:
        ex.reject(408)
    elif kind == D_BODY:
        if ex.rpause:                  # we stopped reading: not the client's fault
            ex.deadline = now + ex.proxy.settings.body_timeout
            return
        ex.req_keep = False
        up, ex.up = ex.up, None
        if up is not None:
            up.client = None
            up.transport.close()
        ex._finish_request(408, False)
        if not ex.resp_started:
            ex.transport.write(error_response(408, True, ex.req_head_only))
        ex._close()
    elif kind == D_RESPONSE:
        up = ex.up
        if up is not None and up.paused:
            # the client has read nothing for a whole response timeout: it holds an app
            # connection for nothing, let both go
            ex.up = None
            up.client = None
            up.transport.close()
            ex._finish_request(ex.resp_status, False)
            return ex._close()
        ex.upstream_error(504)


def drain_abort(ex: Exchange, why: str = "drain timeout") -> None:
    """Drain timeout: whatever is still open to the draining slot is closed now (a WebSocket
    tunnel with 1001)."""
    if ex.state == S_TUNNEL:
        ex.tunnel_cut(why)
    elif ex.resp_started:
        tunnel.end(ex)       # a response under way: cut both sides, recorded with its status
    else:
        ex.req_keep = False
        ex.upstream_error(504)


def retire_abort(ex: Exchange) -> None:
    """Retire timeout: a request still unanswered gets a 504, anything else is closed."""
    if ex.req_slot is not None or ex.state == S_TUNNEL:
        drain_abort(ex, "retire timeout")
    else:
        ex._close()
