"""Fuzz targets: each takes arbitrary bytes and fails (AssertionError, or any exception other than
the proxy's own HttpError) when the proxy's parsing disagrees with the strict reader
(tests/fuzz/strict.py) in a way a backend or a client could read differently.

The same functions run under hypothesis (tests/fuzz/test_fuzz.py, in `make test`) and under
atheris, coverage-guided (tests/fuzz/run.py, `make fuzz`). The first input byte picks where the
rest is split into two reads, so every target also checks that framing does not depend on how
the bytes arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httptools

from changeover.proxy import http1
from changeover.proxy.http1 import HOST, ChunkScanner, HttpError, origin_form, rewrite_request
from changeover.proxy.upstream import Upstream, UpstreamConn
from tests.fuzz import strict

Outcome = tuple[Any, ...]


def _split(data: bytes) -> tuple[bytes, list[bytes]]:
    if not data:
        return b"", [b""]
    rest = data[1:]
    cut = data[0] % (len(rest) + 1)
    return rest, [rest[:cut], rest[cut:]]


# -- the chunk scanner ----------------------------------------------------------------------------
def _scan(pieces: list[bytes]) -> Outcome:
    sc = ChunkScanner()
    seen = 0
    for piece in pieces:
        try:
            end = sc.feed(piece)
        except HttpError as e:
            return ("bad", e.status)
        if end >= 0:
            return ("done", seen + end)
        seen += len(piece)
    return ("more",)


def chunk_scanner(data: bytes) -> None:
    body, pieces = _split(data)
    whole, split = _scan([body]), _scan(pieces)
    assert whole == split, (whole, split)
    try:
        ref: Outcome = ("done", strict.read_chunked(body, 0)[2])
    except strict.Incomplete:
        ref = ("more",)
    except strict.Ambiguous:
        ref = ("bad", 400)
    if ref != whole and whole == ("bad", 400):
        lines = body.split(b"\n")
        if any(len(x) > http1.MAX_CHUNK_LINE for x in lines) or len(body) > http1.MAX_TRAILERS:
            return   # refused for its size: stricter than the reader, never a desync
    assert whole == ref, f"scanner {whole}, strict reader {ref}"


# -- request heads ----------------------------------------------------------------------------------
class _Validate:
    pass


def request_head(data: bytes) -> None:
    """A head llhttp accepts is rewritten (as client.py does) into one the strict reader reads with
    the same request line and the same framing; a head the proxy refuses raises HttpError only."""
    _, pieces = _split(data)
    head = b"".join(pieces)
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return
    head = head[:end + 4]
    if head[0] < 14:   # empty lines before the request line are skipped, a bare CR refused (client.py)
        rest = head.lstrip(b"\r\n")
        empty = head[:len(head) - len(rest)]
        if empty.count(b"\r") != empty.count(b"\r\n") or not rest:
            return
        head = rest
    parser = httptools.HttpRequestParser(_Validate())
    upgrade = False
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError:
        return                                     # refused with 400
    # the request line's checks of client.py: `method SP target SP HTTP/1.x CRLF` or 400
    lf = head.find(b"\n")
    version = head[lf - 10:lf]
    if version not in (b" HTTP/1.1\r", b" HTTP/1.0\r"):
        return
    method = parser.get_method()
    target = len(method) + 1
    if head.find(b" ", target) != lf - 10:
        return
    if method == b"CONNECT":
        return
    try:
        if head[target] != 47 and head[target:target + 2] != b"* ":
            head = origin_form(head)
        http11 = version == b" HTTP/1.1\r"
        r = rewrite_request(head, b"192.0.2.1", upgrade, http11)
    except HttpError:
        return
    if (http11 and HOST.search(head) is None) or (r.chunked and not http11):
        return
    body = b"0\r\n\r\n" if r.chunked else b"x" * r.length
    try:
        got, n = strict.read_request(r.out + body)
    except (strict.Ambiguous, strict.Incomplete) as e:
        raise AssertionError(f"forwarded a head the strict reader refuses ({e}): {r.out!r}") from None
    assert n == len(r.out) + len(body), (n, r.out)
    assert got.start == head[:head.find(b"\r\n")], (got.start, head)
    assert [v.lower() for v in got.get(b"transfer-encoding")] == ([b"chunked"] if r.chunked else [])  # §7: any case
    assert (int(got.get(b"content-length")[0]) if got.get(b"content-length") else 0) == r.length
    assert not any(name in got.get(b"connection") for name in (b"keep-alive",))
    try:
        theirs, _ = strict.read_request(head + body)
    except (strict.Ambiguous, strict.Incomplete):
        return   # the strict reader refuses the client's head: the proxy made it unambiguous
    assert theirs.body == got.body, "the proxy and the strict reader frame the body differently"


# -- responses ----------------------------------------------------------------------------------
class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Settings:
    response_timeout = 60.0


class _Proxy:
    now = 0.0
    settings = _Settings()
    retiring = False


class _Client:
    """What UpstreamConn needs of an exchange: the request's facts and where the response goes."""

    def __init__(self, head_only: bool) -> None:
        self.transport = _Transport()
        self.proxy = _Proxy()
        self.req_http11 = True
        self.req_upgrade = False
        self.req_head_only = head_only
        self.resp_status = 0
        self.resp_started = False
        self.wpaused = False
        self.deadline = 0.0
        self.ended: str = ""

    def response_head(self, head: bytes, close_delimited: bool) -> bytes:
        return head + b"Via: 1.1 changeover\r\n\r\n"

    def upstream_error(self, status: int) -> None:
        self.ended = f"error {status}"

    def abort(self) -> None:
        self.ended = "abort"

    def response_done(self, up: UpstreamConn, reusable: bool) -> None:
        self.ended = f"done reusable={reusable}"

    def tunnel_open(self, up: UpstreamConn) -> None:
        self.ended = "tunnel"

    def upstream_lost(self, up: UpstreamConn) -> None:
        self.ended = "lost"


def _respond(pieces: list[bytes], head_only: bool) -> tuple[str, bytes]:
    up = UpstreamConn(Upstream("127.0.0.1", 9))
    transport = _Transport()
    up.transport = transport   # type: ignore[assignment]
    c = _Client(head_only)
    up.attach(c)  # type: ignore[arg-type]
    for piece in pieces:
        # After the response, bytes still arrive at the connection (client None): they close it,
        # as they do in the proxy while a bodiless response's connection settles.
        if piece and not transport.closed:
            up.data_received(piece)
    ended = c.ended
    if ended == "done reusable=True" and transport.closed:
        ended = "done reusable=False"
    return ended, b"".join(c.transport.out)


def response(data: bytes) -> None:
    """What reaches the client is a head the strict reader accepts, followed by no more body bytes
    than that head frames (stray bytes would be read as the next response)."""
    head_only = bool(data[:1]) and data[0] & 0x80 != 0
    raw, pieces = _split(data)
    whole = _respond([raw], head_only)
    split = _respond(pieces, head_only)
    # A body streams: cut by bad framing, the split run may have passed on more of it first.
    assert whole[0] == split[0], (whole, split)
    assert whole[1].startswith(split[1]) or split[1].startswith(whole[1]), (whole, split)
    _check(*whole, head_only)
    _check(*split, head_only)


def _check(ended: str, out: bytes, head_only: bool) -> None:
    if not out:
        return
    pos = 0
    while True:
        try:
            m, n = strict.read_response_head(out[pos:])
        except strict.Incomplete:
            if pos and (not ended or ended.startswith("error")):   # interim heads, then waiting or a 502
                return
            raise AssertionError(f"an incomplete head reached the client: {out!r}") from None
        except strict.Ambiguous as e:
            if "Content-Length" in str(e) and (head_only or out[pos + 9:pos + 12] in (b"204", b"304")
                                               or out[pos + 9:pos + 10] == b"1"):
                return   # no body is read after it whatever it says: no desync (docs/security.md)
            raise AssertionError(f"a head the strict reader refuses reached the client ({e}): {out!r}") from None
        pos += n
        status = int(m.start[9:12])
        if status >= 200 or status == 101:
            break
    if status != 101:
        for hop in (b"connection", b"keep-alive", b"upgrade", b"trailer", b"te"):
            assert not m.get(hop), f"hop-by-hop {hop!r} forwarded"
    body = out[pos:]
    if head_only or status in (204, 304):
        assert not body, f"bytes after a bodiless response: {body!r}"
    elif m.get(b"content-length"):
        assert len(body) <= int(m.get(b"content-length")[0]), "more body than Content-Length"
    elif m.get(b"transfer-encoding") and m.get(b"transfer-encoding")[-1].lower().endswith(b"chunked"):
        try:
            end = strict.read_chunked(body, 0)[2]
            assert end == len(body), "bytes after the last chunk"
        except strict.Incomplete:
            pass
        except strict.Ambiguous:
            assert ended == "abort", f"bad chunked framing forwarded and not cut: {body!r}"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "chunks": chunk_scanner,
    "request_head": request_head,
    "response": response,
}
