"""The outcome of a response head seen before is reused (upstream._HEADS), and only where it
depends on the head's bytes alone: a HEAD request's response, which has the same head as GET's
but no body, is never framed from a GET's cached outcome, and the other way round."""

from __future__ import annotations

from changeover.proxy import upstream
from changeover.proxy.embedded import EmbeddedProxy

from .conftest import raw, read_response


def test_get_and_head_with_the_same_head_keep_their_own_framing(proxy: EmbeddedProxy) -> None:
    upstream._HEADS.clear()
    with raw(proxy.port) as s:
        for method in ("GET", "GET", "HEAD", "GET", "HEAD", "HEAD", "GET"):
            s.sendall(f"{method} / HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            status, _, body = read_response(s, head_only=method == "HEAD")
            assert status == 200
            assert body == (b"" if method == "HEAD" else b"blue"), method
    assert upstream._HEADS, "the GET response's head was kept"


def test_the_kept_outcomes_are_bounded(proxy: EmbeddedProxy) -> None:
    upstream._HEADS.clear()
    with raw(proxy.port) as s:
        for n in range(1, upstream._HEADS_MAX + 20):       # a different Content-Length each time
            s.sendall(f"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n".encode() + b"x" * n)
            status, _, body = read_response(s)
            assert status == 200 and body == b"x" * n
    assert len(upstream._HEADS) <= upstream._HEADS_MAX
