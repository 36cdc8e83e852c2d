"""Malformed and smuggling requests get the right 4xx and never reach the app."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, raw, read_response

H = b"Host: t\r\n"
CORPUS: list[tuple[str, bytes, int]] = [
    ("CL and TE", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("TE and CL", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("duplicate CL", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("conflicting CL", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("CL list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("CL sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("CL negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("CL hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("CL space inside", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\n", 400),
    ("TE gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("TE chunked then gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("TE gzip, chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("TE xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
    ("TE space before colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("TE vertical tab", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold TE", b"POST / HTTP/1.1\r\n" + H + b"X-A: b\r\n Transfer-Encoding: chunked\r\n\r\n", 400),
    ("bare LF", b"GET / HTTP/1.1\n" + b"Host: t\n\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    ("NUL in value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("bad chunk size", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk size space", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
     400),
    ("chunk size overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"10000000000000003\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk bare LF", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
    ("chunk data too long", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
     400),
    ("chunk negative", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk 0x prefix", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    ("no Host in 1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", 400),
    ("HTTP/2.0 line", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("bad method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("header name space", b"GET / HTTP/1.1\r\n" + H + b"X Y: 1\r\n\r\n", 400),
    ("header no colon", b"GET / HTTP/1.1\r\n" + H + b"XY\r\n\r\n", 400),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    ("unknown Expect", b"POST / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n", 417),
    ("bare CR in a trailer", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"0\r\nX-T: a\rSet-Cookie: b\r\n\r\n", 400),
    ("NUL in a trailer", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\x00b\r\n\r\n",
     400),
    ("leading bare CR", b"\rGET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-form, not http", b"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-form with userinfo", b"GET http://u:p@h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("absolute-form, two Hosts", b"GET http://h/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("absolute-form, no Host in 1.1", b"GET http://h/ HTTP/1.1\r\n\r\n", 400),
]


@pytest.mark.parametrize(("name", "request_bytes", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(proxy: EmbeddedProxy, backends: tuple[Backend, Backend], name: str, request_bytes: bytes,
                status: int) -> None:
    with raw(proxy.port) as s:
        s.sendall(request_bytes)
        got, headers, _ = read_response(s)
        assert got == status, name
        assert headers.get("connection") == "close"
        assert s.recv(100) == b""            # closed: nothing after it is parsed
    assert backends[0].heads == 0, f"{name} reached the app"


def test_smuggled_second_request_never_reaches_app(proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    attack = (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\nGET /admin HTTP/1.1\r\n" + H + b"\r\n")
    with raw(proxy.port) as s:
        s.sendall(attack)
        assert read_response(s)[0] == 400
    assert backends[0].heads == 0


def test_limits(lt: object, backends: tuple[Backend, Backend]) -> None:
    from .conftest import make_proxy
    p = make_proxy(lt, backends, max_header_bytes=1024, max_body_bytes=100)  # type: ignore[arg-type]
    try:
        with raw(p.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 2000 + b"\r\n\r\n")
            assert read_response(s)[0] == 431
        with raw(p.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 2000)   # no end of head yet
            assert read_response(s)[0] == 431
        with raw(p.port) as s:
            s.sendall(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 101\r\n\r\n")
            assert read_response(s)[0] == 413
        with raw(p.port) as s:
            s.sendall(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n65\r\n" + b"a" * 101
                      + b"\r\n0\r\n\r\n")
            assert read_response(s)[0] == 413
        assert backends[0].seen == []
        with raw(p.port) as s:                # at the limit is fine
            s.sendall(b"POST /count HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n" + b"a" * 100)
            assert read_response(s)[2] == b"100"
    finally:
        lt.run(p.close())  # type: ignore[attr-defined]


TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=20)
FIELD_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
SPECIAL = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect", "te", "trailer",
           "keep-alive", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(TOKEN, st.text(max_size=10)), value=st.one_of(FIELD_VALUE, st.text(max_size=10)))
def test_random_headers(proxy: EmbeddedProxy, backends: tuple[Backend, Backend], name: str, value: str) -> None:
    """Any header is either passed on intact or refused with a 4xx that never reaches the app."""
    assume(":" not in name)                # the name would end at that colon: another header
    before = backends[0].heads
    line = name.encode("utf-8", "surrogatepass") + b": " + value.encode("utf-8", "surrogatepass")
    with raw(proxy.port) as s:
        s.sendall(b"GET /headers HTTP/1.1\r\n" + H + line + b"\r\n\r\n")
        status, _, _ = read_response(s)
    lname = name.lower()
    wire_value = value.encode("utf-8", "surrogatepass").decode("latin-1").strip(" \t")
    if status == 200:
        seen = backends[0].seen[-1].headers
        if lname in SPECIAL or lname.startswith("proxy-") or lname.replace("_", "-") in SPECIAL:
            assert seen.get(lname) != wire_value or lname in ("host", "via", "expect")
        else:
            assert seen[lname].strip(" \t") == wire_value   # passed on intact
    else:
        assert 400 <= status < 500
        assert backends[0].heads == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cl=st.one_of(st.integers(0, 50).map(str), st.text(alphabet="0123456789+- ,x\t", min_size=0, max_size=2)))
def test_content_length_variants(proxy: EmbeddedProxy, backends: tuple[Backend, Backend], cl: str) -> None:
    body = b"z" * 100
    before = backends[0].heads
    with raw(proxy.port) as s:
        s.sendall(b"POST /count HTTP/1.1\r\n" + H + b"Content-Length: " + cl.encode() + b"\r\n\r\n" + body)
        status, _, got = read_response(s)
    stripped = cl.strip(" \t")
    if stripped.isdigit():
        assert status == 200 and got == str(int(stripped)).encode()
    else:
        assert status == 400 and backends[0].heads == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 300), max_size=5),
       fmt=st.sampled_from(["%x", "%X", "%04x", "%x;ext=1", "%x ", " %x", "%x;", "+%x", "%d0x"]))
def test_chunk_size_variants(proxy: EmbeddedProxy, backends: tuple[Backend, Backend], sizes: list[int],
                             fmt: str) -> None:
    before = backends[0].heads
    body = b"".join((fmt % n).encode() + b"\r\n" + b"c" * n + b"\r\n" for n in sizes) + b"0\r\n\r\n"
    with raw(proxy.port) as s:
        s.sendall(b"POST /count HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        status, _, got = read_response(s)
    valid = fmt in ("%x", "%X", "%04x", "%x;ext=1")
    if valid or not sizes:
        assert status == 200 and got == str(sum(sizes)).encode()
    else:
        assert status == 400 and backends[0].heads == before
