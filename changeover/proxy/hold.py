"""Pause and maintenance in the embedded proxy: the gate a request passes while either is on.

`EmbeddedProxy.gate` is None while traffic flows normally, so a request pays one attribute check.
It points at the proxy's `Gate` while a pause or maintenance is on:

- **Paused**: a request whose head completes is held. Reading from its connection stops (a body
  waits in the socket), nothing is forwarded or answered, and it joins a queue in arrival order.
  `resume()`, or the pause's own deadline (so a pause ends at its timeout even while no daemon
  runs), routes the held requests in that order to the slot live at that moment: a switch made
  during the pause is what they reach. Past `max_held` held requests a new one is answered 503
  with `Retry-After` instead of piling up. A held request's latency is measured from its release.
- **Maintenance**: every public request is answered 503 with the page, `Retry-After` and
  `Cache-Control: no-store`; requests already forwarded finish as usual. The health check and
  the drill route are answered or routed before the gate and are not affected. These answers
  are the proxy's, not the app's: they are not recorded against a slot, so the monitor does not
  take them for a failing release. Maintenance wins over a pause: requests released while it is
  on get the page.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from changeover.errors import ChangeoverError
from changeover.proxy.exchange import D_NONE, P_HOLD, S_WAIT

if TYPE_CHECKING:
    from changeover.proxy.client import ClientConn
    from changeover.proxy.embedded import EmbeddedProxy

log = logging.getLogger("changeover.proxy")

MAX_PAUSE = 3600.0                 # seconds: a pause is brief by design
MAX_PAGE_BYTES = 1024 * 1024
DEFAULT_PAGE = (b"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Down for maintenance</title></head>\n"
                b"<body><h1>Down for maintenance</h1><p>This site is being worked on and will be back shortly.</p>"
                b"</body></html>\n")
RETIRE_MARGIN = 0.8                # a retiring proxy releases what it holds by this share of its retire timeout

# what a held request needs to be routed later: (connection, method, rewritten head, bytes after
# the head, content length, chunked)
Held = tuple["ClientConn", bytes, bytes, bytes, int, bool]


def _answer(status: bytes, ctype: bytes, body: bytes, retry_after: int, close: bool, head_only: bool) -> bytes:
    head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nCache-Control: no-store\r\n"
            b"Retry-After: " + str(retry_after).encode() + b"\r\nContent-Length: " + str(len(body)).encode()
            + (b"\r\nConnection: close" if close else b"") + b"\r\nVia: 1.1 changeover\r\n\r\n")
    return head if head_only else head + body


class Gate:
    """The proxy's pause and maintenance state (see the module docstring)."""

    def __init__(self, proxy: EmbeddedProxy) -> None:
        self.proxy = proxy
        self.paused = False
        self.paused_at = 0.0               # wall-clock times, as the daemon records them
        self.until = 0.0
        self.max_held = 0
        self.held: deque[Held] = deque()
        self.released = 0                  # held requests released since the proxy started
        self.refused = 0                   # requests answered 503 because the hold was full
        self._timer: asyncio.TimerHandle | None = None
        self.maintenance = False
        self.maintenance_since = 0.0
        self.retry_after = 0
        self.page = b""
        self._answers: dict[tuple[bool, bool], bytes] = {}

    def _arm(self) -> None:
        self.proxy.gate = self if (self.paused or self.maintenance) else None

    # -- control -----------------------------------------------------------------------------------
    def pause(self, timeout: float, max_held: int) -> dict[str, Any]:
        """Hold new requests for up to `timeout` seconds (a pause already on gets the new deadline)."""
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_PAUSE:
            raise ChangeoverError(f"pause timeout {timeout!r}: expected seconds, more than 0 and at most {MAX_PAUSE:g}")
        if not isinstance(max_held, int) or max_held < 1:
            raise ChangeoverError(f"pause max_held {max_held!r}: expected a whole number of at least 1")
        now = time.time()
        if not self.paused:
            self.paused_at = now
        self.paused, self.until, self.max_held = True, now + timeout, max_held
        self._schedule(timeout)
        self._arm()
        log.info("paused: holding new requests for up to %.1fs (at most %d)", timeout, max_held)
        return self.mode()

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        n = self.resume()
        log.warning("the pause timeout passed: resumed by itself, %d held request(s) released", n)

    def resume(self) -> int:
        """End the pause; the held requests are routed in arrival order. Returns how many."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.paused:
            return 0
        self.paused, self.until = False, 0.0
        self._arm()
        held, self.held = self.held, deque()
        for item in held:
            self._release(item)
        self.released += len(held)
        log.info("resumed: %d held request(s) released", len(held))
        return len(held)

    def _release(self, item: Held) -> None:
        conn, method, out, rest, length, chunked = item
        conn.unpause(P_HOLD)               # reading resumes from the next loop turn: routed first
        if conn.closed:
            return
        try:
            if self.maintenance:
                self._page(conn, rest, length, chunked)
            else:
                conn._route(method, out, rest, length, chunked, self.proxy.live_slot)
        except Exception:                  # one broken connection must not keep the others held
            log.exception("releasing a held request failed")
            conn.transport.abort()

    def retiring(self, timeout: float) -> None:
        """This proxy hands over to a successor (which gets the pause itself): what it holds is
        released before its retire timeout would cut it."""
        if self.paused:
            left = self.until - time.time()
            self._schedule(max(0.0, min(left, timeout * RETIRE_MARGIN)))

    def set_maintenance(self, on: bool, page: bytes | None = None, retry_after: int = 30) -> dict[str, Any]:
        if not on:
            self.maintenance, self.page, self._answers = False, b"", {}
            self._arm()
            log.info("maintenance off")
            return self.mode()
        page = page or DEFAULT_PAGE
        if len(page) > MAX_PAGE_BYTES:
            raise ChangeoverError(f"maintenance page of {len(page)} bytes: at most {MAX_PAGE_BYTES} bytes")
        if not isinstance(retry_after, int) or isinstance(retry_after, bool) or not 0 <= retry_after <= 86400:
            raise ChangeoverError(f"retry_after {retry_after!r}: expected whole seconds, 0 to 86400")
        if not self.maintenance:
            self.maintenance_since = time.time()
        self.maintenance, self.page, self.retry_after = True, page, retry_after
        self._answers = {(close, head_only): _answer(b"503 Service Unavailable", b"text/html; charset=utf-8", page,
                                                     retry_after, close, head_only)
                         for close in (False, True) for head_only in (False, True)}
        self._arm()
        log.info("maintenance on (%d-byte page, Retry-After %d)", len(page), retry_after)
        return self.mode()

    def mode(self) -> dict[str, Any]:
        """What the proxy does now, for the daemon's status (and a successor's preload)."""
        return {"paused": self.paused, "paused_at": self.paused_at if self.paused else None,
                "until": self.until if self.paused else None, "held": len(self.held), "max_held": self.max_held,
                "released": self.released, "refused": self.refused,
                "maintenance": self.maintenance, "maintenance_since": self.maintenance_since if self.maintenance
                else None, "retry_after": self.retry_after if self.maintenance else None,
                "page_bytes": len(self.page)}

    def apply(self, mode: dict[str, Any]) -> None:
        """Pause and maintenance as the daemon wants them: {"pause": {"timeout", "max_held"} | None,
        "maintenance": {"page", "retry_after"} | None}, the shape `wire()` gives."""
        pause, maint = mode.get("pause"), mode.get("maintenance")
        if isinstance(maint, dict):
            page = maint.get("page")
            self.set_maintenance(True, page.encode() if isinstance(page, str) else None, int(maint["retry_after"]))
        elif self.maintenance:
            self.set_maintenance(False)
        if isinstance(pause, dict):
            self.pause(float(pause["timeout"]), int(pause["max_held"]))
        elif self.paused:
            self.resume()

    def wire(self) -> dict[str, Any]:
        """The mode as `apply` takes it: what another worker is preloaded with."""
        pause = {"timeout": max(0.001, self.until - time.time()), "max_held": self.max_held} if self.paused else None
        maint = {"page": self.page.decode(errors="replace"), "retry_after": self.retry_after} \
            if self.maintenance else None
        return {"pause": pause, "maintenance": maint}

    # -- the request path ------------------------------------------------------------------------------
    def admit(self, conn: ClientConn, method: bytes, out: bytes, rest: bytes, length: int, chunked: bool) -> None:
        """A public request whose head completed while the gate is on."""
        if self.maintenance:
            return self._page(conn, rest, length, chunked)
        if len(self.held) >= self.max_held:
            self.refused += 1
            wait = max(1, math.ceil(self.until - time.time()))
            body = b"503 Service Unavailable: paused, too many requests waiting\n"
            return self._reply(conn, rest, length, chunked,
                               lambda close, head_only: _answer(b"503 Service Unavailable", b"text/plain", body,
                                                                wait, close, head_only))
        conn.pause(P_HOLD)
        conn.state = S_WAIT
        conn.dkind = D_NONE                # no timeout while held: the pause's deadline bounds it
        self.held.append((conn, method, out, rest, length, chunked))

    def _page(self, conn: ClientConn, rest: bytes, length: int, chunked: bool) -> None:
        answers = self._answers
        self._reply(conn, rest, length, chunked, lambda close, head_only: answers[(close, head_only)])

    def _reply(self, conn: ClientConn, rest: bytes, length: int, chunked: bool, make: Any) -> None:
        """Answer without forwarding (as the health check is): a body is not read, so the
        connection then ends; pipelined requests wait their turn."""
        if length or chunked:
            conn.req_keep = False
        elif rest:
            conn.buf += rest
        close = not conn.req_keep or self.proxy.retiring
        conn.transport.write(make(close, conn.req_head_only))
        if close:
            return conn._close()
        conn.state = S_WAIT
        conn.dkind = D_NONE
        self.proxy.loop.call_soon(conn._resume)
