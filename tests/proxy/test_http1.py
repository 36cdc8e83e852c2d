"""ChunkScanner and request rewriting, fed in arbitrary splits (what TCP does to them)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from changeover.proxy.http1 import ChunkScanner, HttpError, origin_form, rewrite_request


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


def test_rewrite_request_from_an_untrusted_peer() -> None:
    head = (b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: evil\r\nForwarded: for=1.1.1.1\r\nX-Real-IP: 1.1.1.1\r\n\r\n")
    assert rewrite_request(head, b"9.9.9.9", False, True).out == (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 9.9.9.9\r\nX-Forwarded-Proto: http\r\n"
        b"Via: 1.1 changeover\r\nX-Forwarded-Host: h\r\n\r\n")
    assert rewrite_request(head, b"9.9.9.9", False, True, trusted=True).out == (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
        b"Forwarded: for=1.1.1.1\r\nX-Real-IP: 1.1.1.1\r\nX-Forwarded-For: 1.1.1.1, 9.9.9.9\r\n"
        b"Via: 1.1 changeover\r\n\r\n")


@pytest.mark.parametrize(("line", "expect"), [
    (b"GET http://a.example/x?y=1 HTTP/1.1", b"GET /x?y=1 HTTP/1.1\r\nHost: a.example"),
    (b"GET HTTPS://a.example:8443 HTTP/1.1", b"GET / HTTP/1.1\r\nHost: a.example:8443"),
    (b"GET http://a.example?q HTTP/1.1", b"GET /?q HTTP/1.1\r\nHost: a.example"),
    (b"GET http://[::1]:80/ HTTP/1.1", b"GET / HTTP/1.1\r\nHost: [::1]:80"),
])
def test_origin_form(line: bytes, expect: bytes) -> None:
    assert origin_form(line + b"\r\nHost: other\r\nX: 1\r\n\r\n") == expect + b"\r\nX: 1\r\n\r\n"


@pytest.mark.parametrize("line", [b"GET ftp://a/ HTTP/1.1", b"GET http://u@a/ HTTP/1.1", b"GET http:///x HTTP/1.1",
                                  b"GET http://a b/ HTTP/1.1", b"GET http://a/#f HTTP/1.1"])
def test_origin_form_refuses(line: bytes) -> None:
    with pytest.raises(HttpError) as info:
        origin_form(line + b"\r\nHost: a\r\n\r\n")
    assert info.value.status == 400


def test_scanner_refuses_bare_cr_and_nul_in_trailers() -> None:
    for trailer in (b"X: a\rb\r\n", b"X: a\x00\r\n"):
        with pytest.raises(HttpError):
            ChunkScanner().feed(b"0\r\n" + trailer + b"\r\n")
