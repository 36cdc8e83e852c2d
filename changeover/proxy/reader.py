"""What a client connection reads besides a whole head: unfinished heads, request bodies, and
the answers the proxy makes itself (the health check, `proxy.edge`).

`Reader` sits between `Exchange` (how an exchange ends, exchange.py) and `ClientConn` (the
request head and its routing, client.py), which holds the hot path.
"""

from __future__ import annotations

from changeover.proxy.exchange import MAX_PENDING, Exchange
from changeover.proxy.http1 import HttpError, error_response
from changeover.proxy.states import D_HEAD, D_IDLE, D_NONE, D_RESPONSE, P_CONNECT, P_PIPELINE, S_WAIT

# connections from one untrusted address that may hold an unfinished request head at once: a
# head normally arrives in one read, so only a slow (slowloris) client holds many
MAX_PARTIAL_HEADS_PER_CLIENT = 64


class Reader(Exchange):
    __slots__ = ()

    # -- answers of the proxy's own ------------------------------------------------------------
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
