"""ChunkScanner and request rewriting, fed in arbitrary splits (what TCP does to them)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from changeover.proxy.http1 import ChunkScanner, HttpError, rewrite_request


def _encode(chunks: list[bytes], ext: bool, trailers: bool) -> bytes:
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(c), b";a=1" if ext else b"", c) for c in chunks if c)
    return out + b"0\r\n" + (b"X-Sum: 1\r\n" if trailers else b"") + b"\r\n"


@given(chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6), ext=st.booleans(),
       trailers=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=8), tail=st.binary(max_size=10))
def test_scanner_finds_the_end_across_any_split(chunks: list[bytes], ext: bool, trailers: bool,
                                                cuts: list[int], tail: bytes) -> None:
    body = _encode(chunks, ext, trailers)
    stream = body + tail
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    scanner = ChunkScanner()
    offset = None
    for a, b in itertools.pairwise(points):
        end = scanner.feed(stream[a:b])
        if end >= 0:
            offset = a + end
            break
    assert offset == len(body)
    assert scanner.done


@pytest.mark.parametrize("bad", [b"g\r\n", b"\r\n", b"1 \r\nx\r\n", b"1\r\nxy\r\n", b"1\nx\r\n",
                                 b"11111111111111111\r\n", b"1;\x01\r\nx\r\n", b"0\r\nbad trailer\r\n\r\n"])
def test_scanner_rejects(bad: bytes) -> None:
    with pytest.raises(HttpError) as info:
        ChunkScanner().feed(bad + b"0\r\n\r\n")
    assert info.value.status == 400


def test_scanner_limit() -> None:
    with pytest.raises(HttpError) as info:
        ChunkScanner(limit=10).feed(b"b\r\n" + b"x" * 11 + b"\r\n0\r\n\r\n")
    assert info.value.status == 413


def test_rewrite_request() -> None:
    head = (b"POST /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
            b"Transfer-Encoding: chunked\r\nX-Forwarded-For: 1.1.1.1\r\nTE: trailers\r\nX-Keep: 2\r\n\r\n")
    r = rewrite_request(head, b"9.9.9.9", False, True, trusted=True)
    assert r.chunked and r.keep_alive and not r.upgrade
    assert r.out == (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-Keep: 2\r\n"
                     b"X-Forwarded-For: 1.1.1.1, 9.9.9.9\r\nX-Forwarded-Proto: http\r\nVia: 1.1 changeover\r\n"
                     b"X-Forwarded-Host: h\r\n\r\n")
    r = rewrite_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"9.9.9.9", False, False)
    assert r.keep_alive
    r = rewrite_request(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", b"9.9.9.9", False, True)
    assert not r.keep_alive
