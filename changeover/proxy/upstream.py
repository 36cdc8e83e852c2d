"""The app side of the embedded proxy: keep-alive connections to app instances, and the responses.

An `UpstreamConn` is a keep-alive connection to one app instance. While a client request is
attached to it, it reads the response: the head is rewritten once (hop-by-hop headers out, Via in)
and the body bytes are passed through untouched, framed by Content-Length, chunked (followed by
`ChunkScanner`) or connection close. When the response completes it goes back to its
instance's idle list, so the next request on the hot path needs no connect and no task.

The instances and their idle lists are pool.py's (`Upstream`, `UpstreamPool`, re-exported here).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, cast

from changeover.proxy.http1 import (
    CLEAN_RESPONSE_HEAD,
    RESP_CONNECTION,
    RESP_HOP,
    ChunkScanner,
    HttpError,
    bad_response_header,
    connection_tokens,
    drop_header,
)
from changeover.proxy.pool import Upstream, UpstreamPool

if TYPE_CHECKING:
    from changeover.proxy.exchange import Exchange

__all__ = ["MAX_RESPONSE_HEAD", "SETTLE", "Upstream", "UpstreamConn", "UpstreamPool"]

log = logging.getLogger("changeover.proxy")

# outcomes of recently seen response heads (UpstreamConn._head): status, keep-alive on the app side,
# framing, length, the head for the client (HTTP/1.1, no hop-by-hop headers), close-delimited,
# bodiless; bounded, cleared when full
_HEADS: dict[bytes, tuple[int, bool, int, int, bytes, bool, bool]] = {}
_HEADS_MAX = 256
_HEADS_KEY_MAX = 4096                 # larger heads are parsed every time (at most 1 MB kept)
MAX_RESPONSE_HEAD = 64 * 1024
# after a response that has no body (HEAD, 204, 304) the connection waits this long before it
# is reused: an app that writes a body anyway (`do_HEAD = do_GET`) would otherwise hand those
# bytes to the next request as its response. Bytes arriving meanwhile close the connection.
SETTLE = 0.05
_BLANK_LINE = re.compile(rb"\n\r?\n")       # the end of a head with bare-LF line endings
_LINE_END = re.compile(rb"\r?\n")
_RESP_HOP_NAMES = re.compile(rb"\r\n(?:connection:|keep-alive:|proxy-|te:|trailer:|upgrade:)")   # on .lower()
# response states
R_IDLE, R_HEAD, R_LENGTH, R_CHUNKED, R_EOF, R_TUNNEL, R_DONE = range(7)


class UpstreamConn(asyncio.Protocol):
    __slots__ = ("bodiless", "buf", "client", "closed", "got_bytes", "idle_since", "paused", "remaining", "reusable",
                 "reused", "scanner", "state", "status", "transport", "upstream")

    transport: asyncio.Transport

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.client: Exchange | None = None
        self.buf = b""
        self.state = R_IDLE
        self.remaining = 0
        self.scanner: ChunkScanner | None = None
        self.closed = False
        self.paused = False
        self.got_bytes = False
        self.reusable = True
        self.reused = False
        self.status = 0
        self.idle_since = 0.0
        self.bodiless = False              # the last response had no body by definition (SETTLE)

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def attach(self, client: Exchange) -> None:
        self.client = client
        self.state = R_HEAD
        self.got_bytes = False
        self.bodiless = False
        self.buf = b""
        if client.wpaused:
            self.transport.pause_reading()
            self.paused = True

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c is None:                      # unsolicited bytes on an idle connection
            self.reusable = False
            self.transport.close()
            return
        self.got_bytes = True
        state = self.state
        if state == R_HEAD:
            self._head(data)
        elif state == R_LENGTH:
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                c.deadline = c.proxy.now + c.proxy.settings.response_timeout
                c.transport.write(data)
                return
            self._body_end(data, self.remaining)
        elif state == R_CHUNKED:
            self._chunked(data)
        elif state == R_TUNNEL:
            c.tunnel_out(data)             # exchange.py: idle timeout, drain limit, WebSocket frames
        elif state == R_EOF:
            c.deadline = c.proxy.now + c.proxy.settings.response_timeout
            c.transport.write(data)
        else:                              # bytes after a complete response: broken framing
            self.reusable = False
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        c = self.client
        if c is None:
            try:
                self.upstream.idle.remove(self)
            except ValueError:
                pass
            return
        self.client = None
        if self.state == R_EOF:
            c.response_done(self, False)
        else:
            c.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause(2)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.unpause(2)

    # -- response parsing ---------------------------------------------------------------------
    def _head(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        # one call (partition takes one argument, find's are parsed): the head without its blank line
        key, blank, rest = data.partition(b"\r\n\r\n")
        if not blank or len(key) > MAX_RESPONSE_HEAD:
            return self._head_slow(data)
        c = self.client
        assert c is not None
        hit = None if c.req_head_only else _HEADS.get(key)
        if hit is not None:
            # the same head as a response seen before (only the Date line changes, once a second):
            # everything below depends on its bytes alone, so its outcome is reused
            status, keep, framing, length, head, eof, self.bodiless = hit
            self.reusable = keep and c.req_http11
            self.status = c.resp_status = status
            out = c.response_head(head, eof)
        else:
            head = key + b"\r\n"             # ending with its last line's CRLF, as CLEAN_RESPONSE_HEAD reads it
            if CLEAN_RESPONSE_HEAD.match(head) is None:
                return self._head_slow(data)   # bare-LF line endings are normalised there, the rest 502
            status = int(head[9:12])
            http11 = head[7] == 49
            if status < 200 and status != 101:
                if status < 100:
                    return self._bad(f"status {status} (not a status code)")
                # interim (100 Continue, 103 Early Hints): forward to 1.1 clients, keep waiting
                if c.req_http11:
                    c.transport.write(RESP_HOP.sub(b"", head) + b"\r\n")
                if rest:
                    self._head(rest)
                return
            parsed = self._parse(head, status, http11, c)
            if parsed is None:
                return
            close, framing, length, head = parsed
            keep = not close and framing != R_EOF and framing != R_TUNNEL
            self.reusable = keep and c.req_http11
            self.status = c.resp_status = status
            if framing == R_TUNNEL:
                out = head + b"\r\n"
                c.resp_started = True
            else:
                if not http11:
                    head = b"HTTP/1.1" + head[8:]
                out = c.response_head(head, framing == R_EOF)
                if not c.req_head_only and len(key) <= _HEADS_KEY_MAX:
                    if len(_HEADS) >= _HEADS_MAX:
                        _HEADS.clear()
                    _HEADS[key] = (status, keep, framing, length, head, framing == R_EOF, self.bodiless)
        if framing == R_LENGTH:
            n = len(rest)
            if n < length:
                c.transport.write(out + rest if n else out)
                self.remaining = length - n
                self.state = R_LENGTH
                return
            c.transport.write(out + rest[:length])
            if len(rest) > length:
                self.reusable = False
            self.state = R_DONE            # _done(), one call less on the hot path
            self.client = None
            return c.response_done(self, self.reusable)
        c.transport.write(out)
        if framing == R_DONE:
            if rest:
                self.reusable = False
            return self._done()
        self.state = framing
        if framing == R_CHUNKED:
            self.scanner = ChunkScanner()
            if rest:
                self._chunked(rest)
        elif framing == R_TUNNEL:
            c.tunnel_open(self)
            if rest:
                c.tunnel_out(rest)
        elif rest:
            c.transport.write(rest)

    def _parse(self, head: bytes, status: int, http11: bool,
               c: Exchange) -> tuple[bool, int, int, bytes] | None:
        """Connection semantics and framing of a clean response head: (close, framing, length,
        the head without hop-by-hop headers); None when it was refused (502 sent)."""
        close = not http11
        low = head.lower()
        # one search for every hop-by-hop header (`x in bytes` costs twice a find: avoided here)
        hop = _RESP_HOP_NAMES.search(low) is not None
        if hop and low.find(b"\r\nconnection:") >= 0:
            tokens: set[bytes] = set()
            for m in RESP_CONNECTION.finditer(head):
                tokens |= connection_tokens(m.group(1))
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens:
                close = False
            for name in tokens - _KNOWN_CONN_TOKENS:
                head = drop_header(head, name)
        framing = R_DONE
        length = 0
        if status == 101:
            if not c.req_upgrade:
                self._bad()
                return None
            framing = R_TUNNEL
        else:
            if hop:
                head = RESP_HOP.sub(b"", head)
                low = head.lower()
            self.bodiless = c.req_head_only or status == 204 or status == 304
            if not self.bodiless:
                cl = low.find(b"\r\ncontent-length:")
                te = low.rfind(b"\r\ntransfer-encoding:")   # several: the last holds the final coding
                if te >= 0:
                    if cl >= 0:
                        self._bad()
                        return None   # both: a desync risk, never pass it on
                    value = low[te + 20:low.find(b"\r\n", te + 20)].strip(b" \t")
                    framing = R_CHUNKED if value.endswith(b"chunked") else R_EOF
                elif cl < 0:
                    framing = R_EOF
                else:
                    e = low.find(b"\r\n", cl + 17)
                    v = low[cl + 17:e].strip(b" \t")
                    other = low.find(b"\r\ncontent-length:", e)
                    if not v.isdigit() or (other >= 0 and
                                           low[other + 17:low.find(b"\r\n", other + 17)].strip(b" \t") != v):
                        self._bad()
                        return None
                    length = int(v)
                    framing = R_LENGTH if length else R_DONE
        return close, framing, length, head

    def _head_slow(self, data: bytes) -> None:
        """A head that is not complete yet, too big, has bare-LF line endings (accepted, as
        HAProxy and nginx do: normalised to CRLF) or holds what a client could split: a bare CR,
        a NUL or an obs-fold (RFC 9112 §2.2, §5.2; refused with 502, as nginx does)."""
        m = _BLANK_LINE.search(data)
        if m is None:
            if len(data) > MAX_RESPONSE_HEAD:
                return self._bad(f"a response head over {MAX_RESPONSE_HEAD} bytes")
            self.buf = data
            return
        if m.start() > MAX_RESPONSE_HEAD:
            return self._bad(f"a response head over {MAX_RESPONSE_HEAD} bytes")
        head = _LINE_END.sub(b"\r\n", data[:m.start() + 1])
        if CLEAN_RESPONSE_HEAD.match(head) is None:
            return self._bad(bad_response_header(head))
        self._head(head + b"\r\n" + data[m.end():])

    def _body_end(self, data: bytes, n: int) -> None:
        c = self.client
        assert c is not None
        c.transport.write(data if len(data) == n else data[:n])
        if len(data) > n:
            self.reusable = False
        self._done()

    def _chunked(self, data: bytes) -> None:
        c = self.client
        assert c is not None and self.scanner is not None
        try:
            end = self.scanner.feed(data)
        except HttpError:
            self.reusable = False
            c.abort()
            self.transport.close()
            return
        if end < 0:
            c.deadline = c.proxy.now + c.proxy.settings.response_timeout
            c.transport.write(data)
        else:
            self._body_end(data, end)

    def _done(self) -> None:
        c = self.client
        self.state = R_DONE
        self.client = None
        assert c is not None
        c.response_done(self, self.reusable)

    def _bad(self, why: str = "") -> None:
        """An unusable response (bad head or framing): 502 if nothing reached the client yet."""
        if why:
            log.warning("upstream %s:%d sent %s; answered 502", self.upstream.host, self.upstream.port, why)
        self.reusable = False
        c = self.client
        self.client = None
        self.transport.close()
        if c is not None:
            c.upstream_error(502)

    def release(self, reusable: bool, now: float) -> None:
        """Back to the idle pool (or closed) once its exchange is over."""
        self.client = None
        self.state = R_IDLE
        self.scanner = None
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        idle = self.upstream.idle
        if reusable and not self.closed and not self.upstream.retired and len(idle) < self.upstream.max_idle:
            self.reused = True
            if self.bodiless:
                # not in the pool yet: bytes that arrive meanwhile close it (data_received)
                asyncio.get_running_loop().call_later(SETTLE, self._settled, now + SETTLE)
                return
            self.idle_since = now
            idle.append(self)
        else:
            self.transport.close()

    def _settled(self, now: float) -> None:
        """Nothing arrived after a bodiless response: the connection may carry the next one."""
        self.bodiless = False
        idle = self.upstream.idle
        if self.closed or self.client is not None:
            return
        if self.upstream.retired or len(idle) >= self.upstream.max_idle:
            self.transport.close()
            return
        self.idle_since = now
        idle.append(self)


_KNOWN_CONN_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade"))
