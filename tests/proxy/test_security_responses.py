"""Responses from a careless (or hostile) app: headers a client would split, stray bytes after a
bodiless response, huge heads, bare-LF line endings. Scripted apps on real sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Client, LoopThread, raw, read_exact, read_head, read_response, scripted_backend


def use(lt: LoopThread, proxy: EmbeddedProxy, server: asyncio.Server) -> None:
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])


SPLITTABLE = [
    ("bare CR", b"X-A: a\rSet-Cookie: evil=1\r\n", "a bare CR in header 'X-A'"),
    ("NUL", b"X-A: a\x00b\r\n", "a NUL in header 'X-A'"),
    ("obs-fold", b"X-A: a\r\n Set-Cookie: evil=1\r\n", "an obs-fold in header 'X-A'"),
    ("bare CR in the status line", b"", "the status line"),
]


@pytest.mark.parametrize(("name", "header", "logged"), SPLITTABLE, ids=[c[0] for c in SPLITTABLE])
def test_a_header_a_client_could_split_gets_502(lt: LoopThread, proxy: EmbeddedProxy,
                                                caplog: pytest.LogCaptureFixture,
                                                name: str, header: bytes, logged: str) -> None:
    status_line = b"HTTP/1.1 200 OK\rX\r\n" if not header else b"HTTP/1.1 200 OK\r\n"
    server = lt.run(scripted_backend(status_line + header + b"Content-Length: 2\r\n\r\nhi"))
    use(lt, proxy, server)
    with caplog.at_level(logging.WARNING, logger="changeover.proxy"), raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(s)
        assert status == 502
        assert "set-cookie" not in headers
    assert any(logged in r.getMessage() and "502" in r.getMessage() for r in caplog.records), caplog.text
    server.close()


def test_a_100k_response_head_in_one_write_is_refused(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    server = lt.run(scripted_backend(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n"
                                     b"Content-Length: 2\r\n\r\nhi"))
    use(lt, proxy, server)
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 502
    server.close()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nhi",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX-A: b\r\n\nhi",
], ids=["all LF", "mixed"])
def test_bare_lf_line_endings_are_accepted(lt: LoopThread, proxy: EmbeddedProxy, reply: bytes) -> None:
    server = lt.run(scripted_backend(reply))
    use(lt, proxy, server)
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(s)         # read_head needs CRLFs: the client gets them
        assert (status, headers["x-a"], body) == (200, "b", b"hi")
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")   # and the connection is still good
        assert read_response(s)[2] == b"hi"
    server.close()


def test_a_bare_lf_inside_a_crlf_head_is_a_line_end(lt: LoopThread, proxy: EmbeddedProxy) -> None:
    """`X-A: a<LF>Connection: x` is two headers to a browser: the proxy must see the same two."""
    server = lt.run(scripted_backend(b"HTTP/1.1 200 OK\r\nX-A: a\nKeep-Alive: timeout=1\r\n"
                                     b"Content-Length: 2\r\n\r\nhi"))
    use(lt, proxy, server)
    with raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(s)
        assert (status, headers["x-a"], body) == (200, "a", b"hi")
        assert "keep-alive" not in headers                   # hop-by-hop: dropped as a header
    server.close()


class _NaiveHead(asyncio.Protocol):
    """`do_HEAD = do_GET`, and 204/304 with a body anyway: the body (a whole forged response
    here) follows the head a moment later, in a write of its own; the next request on the same
    connection is answered after it, as a real app in order would."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)
        self.buf = b""
        self.stray: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            loop = asyncio.get_running_loop()
            if line.startswith(b"HEAD ") or b"/status" in line:
                code = b"200 OK" if line.startswith(b"HEAD ") else line.split(b"code=")[1][:3] + b" X"
                self.t.write(b"HTTP/1.1 " + code + b"\r\nContent-Length: 5\r\n\r\n")
                self.stray = loop.create_future()
                loop.call_later(0.005, self._stray, self.stray)
            elif self.stray is not None and not self.stray.done():
                self.stray.add_done_callback(lambda _: self._good())
            else:
                self._good()

    def _stray(self, done: asyncio.Future[None]) -> None:
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
        done.set_result(None)

    def _good(self) -> None:
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")


@pytest.mark.parametrize("first", [b"HEAD / HTTP/1.1", b"GET /status?code=204 HTTP/1.1",
                                   b"GET /status?code=304 HTTP/1.1"], ids=["HEAD", "204", "304"])
def test_bytes_after_a_bodiless_response_never_reach_the_next_request(lt: LoopThread, proxy: EmbeddedProxy,
                                                                      first: bytes) -> None:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_NaiveHead, "127.0.0.1", 0)

    server = lt.run(start())
    use(lt, proxy, server)
    with raw(proxy.port) as s:
        for _ in range(3):
            # pipelined: the next request is ready the moment the first response ends
            s.sendall(first + b"\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _ = read_head(s)
            assert status in (200, 204, 304)
            assert read_response(s)[2] == b"good"
    server.close()


def _first_head(s: Client) -> bytes:
    """The client's first response head as raw bytes (a malformed one too)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.unread(buf)
    return buf


# Found by the fuzz harness (tests/fuzz): heads a client may read differently from the proxy
MALFORMED = [
    ("no space after the version", b"HTTP/1.1a200 OK\r\nContent-Length: 2\r\n\r\nhi", "status line"),
    ("HTTP/1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nhi", "status line"),
    ("status under 100", b"HTTP/1.1 099 Odd\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", "status 99"),
    ("no colon", b"HTTP/1.1 200 OK\r\nContent\r\nContent-Length: 2\r\n\r\nhi", "header line 'Content'"),
    ("not a token", b"HTTP/1.1 200 OK\r\nX-;: 1\r\nContent-Length: 2\r\n\r\nhi", "header line 'X-;: 1'"),
    ("a CTL in the name", b"HTTP/1.1 200 OK\r\nConten\x07t-Length: 3\r\nContent-Length: 2\r\n\r\nhi",
     "header 'Conten\\x07t-Length'"),
    ("CR, a byte, LF in the status line", b"HTTP/1.1 200 OK\r\x1a\nContent-Length: 2\r\n\r\nhi",
     "a bare CR in the status line"),
    ("CR, a byte, LF in a value", b"HTTP/1.1 200 OK\r\nX-A: a\r\x1a\nSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nhi",
     "a bare CR in header 'X-A'"),
    ("a CTL in a value", b"HTTP/1.1 200 OK\r\nX-A: a\x1bb\r\nContent-Length: 2\r\n\r\nhi", "header 'X-A'"),
    ("a CTL in an interim head", b"HTTP/1.1 103 Early\r\nLink: a\x0bb\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", "header 'Link'"),
]


@pytest.mark.parametrize(("name", "reply", "logged"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_response_head_gets_502(lt: LoopThread, proxy: EmbeddedProxy, caplog: pytest.LogCaptureFixture,
                                            name: str, reply: bytes, logged: str) -> None:
    server = lt.run(scripted_backend(reply))
    use(lt, proxy, server)
    with caplog.at_level(logging.WARNING, logger="changeover.proxy"), raw(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        head = _first_head(s)
        assert head.startswith(b"HTTP/1.1 502 "), head
    assert any(logged in r.getMessage() and "502" in r.getMessage() for r in caplog.records), caplog.text
    server.close()


def test_a_connection_token_equal_to_the_status_line_drops_only_headers(lt: LoopThread,
                                                                       proxy: EmbeddedProxy) -> None:
    server = lt.run(scripted_backend(b"HTTP/1.1 200 ok\r\nConnection: http/1.1 200 ok, x-a\r\nX-A: 1\r\n"
                                     b"X-B: 2\r\nContent-Length: 2\r\n\r\nhi"))
    use(lt, proxy, server)
    with raw(proxy.port) as s:
        for _ in range(2):                                # and the connection stays in step
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = _first_head(s)
            assert head.startswith(b"HTTP/1.1 200 ok\r\n"), head
            status, headers = read_head(s)
            assert (status, headers["x-b"], read_exact(s, 2)) == (200, "2", b"hi")
            assert "x-a" not in headers and "connection" not in headers
    server.close()
