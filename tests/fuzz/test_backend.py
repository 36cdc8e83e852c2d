"""Request-smuggling and parser cases in the style of the public corpora (HTTP Garden, smuggler's
TE/CL mutations, llhttp's vectors, RFC 9112 edge cases), sent through a real embedded proxy to a
raw-bytes backend. The backend reads what it received with the strict reader: nothing forwarded
may be refused by it (another parser could read it differently), and every message it reads must
be one the strict reader also reads from the client's bytes, in order, with the same method,
path and body. What the harness found is kept as cases of its own at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from changeover.proxy.embedded import EmbeddedProxy
from tests.fuzz import strict
from tests.proxy.conftest import LoopThread, Recorder

H = b"Host: t\r\n"
TE = b"Transfer-Encoding"


def _te_variants() -> list[tuple[str, bytes]]:
    """smuggler-style obfuscations of Transfer-Encoding: chunked, each with a CL.TE body."""
    forms = [b"Transfer-Encoding: chunked", b"Transfer-Encoding : chunked", b"Transfer-Encoding:\tchunked",
             b"Transfer-Encoding: xchunked", b"Transfer-Encoding: chunked-false", b" Transfer-Encoding: chunked",
             b"X: X\nTransfer-Encoding: chunked", b"Transfer-Encoding\n: chunked", b"Transfer-Encoding: \x0bchunked",
             b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding: identity, chunked",
             b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x", b"Transfer_Encoding: chunked",
             b"Transfer-Encoding: \"chunked\"", b"Transfer-Encoding: chunk", b"TRANSFER-ENCODING: CHUNKED",
             b"Transfer-Encoding: chunked\x00", b"Transfer-Encoding:\r\n chunked", b"Transfer-\x00Encoding: chunked",
             b"Transfer-Encoding: \xffchunked", b"Transfer-Encoding:chunked", b"Content-Encoding: chunked"]
    out = []
    for i, form in enumerate(forms):
        body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
        out.append((f"CL.TE {i} {form[:24]!r}", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: " +
                    str(len(body)).encode() + b"\r\n" + form + b"\r\n\r\n" + body))
        out.append((f"TE.CL {i} {form[:24]!r}", b"POST /a HTTP/1.1\r\n" + H + form + b"\r\nContent-Length: 3\r\n\r\n"
                    b"8\r\nSMUGGLED\r\n0\r\n\r\n"))
        out.append((f"TE only {i} {form[:24]!r}", b"POST /a HTTP/1.1\r\n" + H + form + b"\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\n" + H + b"\r\n"))
    return out


CASES: list[tuple[str, bytes]] = [
    ("pipelined", b"GET /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n"),
    ("body then request", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhelloGET /2 HTTP/1.1\r\n" + H
     + b"\r\n"),
    ("CL leading zeros", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 005\r\n\r\nhello"),
    ("CL plus", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello"),
    ("CL duplicate same", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("CL duplicate differ", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("CL list", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello"),
    ("CL space in name", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\nhello"),
    ("CL overflow", b"POST /1 HTTP/1.1\r\n" + H + b"Content-Length: 18446744073709551621\r\n\r\nhello"),
    ("chunk ext", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n5;a=b;c=\"d\"\r\nhello\r\n0\r\n\r\n"),
    ("chunk ext bare CR", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n"),
    ("chunk size LF", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    ("chunk data LF", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n5\r\nhello\n0\r\n\r\n"),
    ("chunk size overflow", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n"
     b"ffffffffffffffff5\r\nhello\r\n0\r\n\r\n"),
    ("chunk size 0x", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk size space", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"),
    ("chunk trailer", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
    ("chunk trailer fold", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"),
    ("chunk trailer no colon", b"POST /1 HTTP/1.1\r\n" + H + TE + b": chunked\r\n\r\n0\r\nX-T\r\n\r\n"),
    ("chunked in 1.0", b"POST /1 HTTP/1.0\r\n" + TE + b": chunked\r\n\r\n0\r\n\r\n"),
    ("leading CRLF", b"\r\n\r\nGET /1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("leading LF", b"\nGET /1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("leading CR", b"\rGET /1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("bare LF line", b"GET /1 HTTP/1.1\n" + H + b"\r\n"),
    ("bare CR value", b"GET /1 HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n"),
    ("NUL value", b"GET /1 HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n"),
    ("obs-fold", b"GET /1 HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n"),
    ("space before colon", b"GET /1 HTTP/1.1\r\n" + H + b"X : a\r\n\r\n"),
    ("empty name", b"GET /1 HTTP/1.1\r\n" + H + b": a\r\n\r\n"),
    ("no Host", b"GET /1 HTTP/1.1\r\n\r\n"),
    ("two Hosts", b"GET /1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("Host with space", b"GET /1 HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ("absolute-form", b"GET http://t/1?q HTTP/1.1\r\nHost: other\r\n\r\n"),
    ("absolute-form userinfo", b"GET http://u@t/1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n"),
    ("HTTP/0.9", b"GET /1\r\n\r\n"),
    ("HTTP/1.2", b"GET /1 HTTP/1.2\r\n" + H + b"\r\n"),
    ("lower-case version", b"GET /1 http/1.1\r\n" + H + b"\r\n"),
    ("tab in request line", b"GET\t/1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("method with space", b"GE T /1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("CONNECT", b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n"),
    ("expect", b"POST /1 HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"),
    ("h2c upgrade", b"GET /1 HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
     b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
    ("connection names CL", b"POST /1 HTTP/1.1\r\n" + H + b"Connection: Content-Length\r\nContent-Length: 5\r\n\r\n"
     b"hello"),
    ("connection names TE", b"POST /1 HTTP/1.1\r\n" + H + b"Connection: Transfer-Encoding\r\n" + TE +
     b": chunked\r\n\r\n0\r\n\r\n"),
    ("1.0 keep-alive", b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n"),
    ("GET with body", b"GET /1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"),
    ("HEAD then GET", b"HEAD /1 HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n"),
    *_te_variants(),
]
CORPUS = Path(__file__).resolve().parent / "corpus" / "request_head"
CASES += [(f"corpus {p.name}", p.read_bytes()[1:]) for p in sorted(CORPUS.iterdir())]


@dataclass
class RawBackend:
    """Records what each connection received and reads it with the strict reader."""

    server: asyncio.Server | None = None
    messages: list[strict.Message] = field(default_factory=list)
    refused: list[tuple[bytes, bytes]] = field(default_factory=list)   # (why, bytes received)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


class _RawConn(asyncio.Protocol):
    def __init__(self, b: RawBackend) -> None:
        self.b, self.buf, self.seen = b, b"", 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        msgs, why = strict.read_requests(self.buf)
        for m in msgs[self.seen:]:
            self.b.messages.append(m)
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.seen = len(msgs)
        if why is not None:
            self.b.refused.append((why, self.buf))
            self.t.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.t.close()


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[LoopThread, EmbeddedProxy, RawBackend]]:
    from changeover.proxy.base import ProxySettings

    logging.disable(logging.WARNING)
    lt = LoopThread()
    b = RawBackend()

    async def start() -> None:
        b.server = await asyncio.get_running_loop().create_server(lambda: _RawConn(b), "127.0.0.1", 0)

    lt.run(start())
    proxy = EmbeddedProxy(ProxySettings(listen="127.0.0.1:0", header_timeout=1, body_timeout=1), Recorder())
    lt.run(proxy.start())
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", b.port)])
    lt.call(proxy.switch, "blue")
    try:
        yield lt, proxy, b
    finally:
        lt.run(proxy.close())
        lt.stop()
        logging.disable(logging.NOTSET)


def _send(port: int, data: bytes) -> bytes:
    """Send a case, half-close, and read until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _path(target: bytes) -> bytes:
    if target.lower().startswith((b"http://", b"https://")):
        rest = target.split(b"//", 1)[1]
        i = min((rest.find(c) for c in (b"/", b"?") if rest.find(c) >= 0), default=len(rest))
        target = rest[i:] or b"/"
        if target[:1] == b"?":
            target = b"/" + target
    return target


def _key(m: strict.Message) -> tuple[bytes, bytes, bytes]:
    method, target, _ = m.start.split(b" ")
    return method, _path(target), m.body


def check(setup: tuple[LoopThread, EmbeddedProxy, RawBackend], data: bytes) -> None:
    _, proxy, b = setup
    b.messages.clear()
    b.refused.clear()
    _send(proxy.port, data)
    assert not b.refused, f"the backend's strict reader refused what the proxy forwarded: {b.refused}"
    theirs, _ = strict.read_requests(data.lstrip(b"\r\n") if data[:1] in b"\r\n" else data)
    got = [_key(m) for m in b.messages]
    want = [_key(m) for m in theirs]
    assert got == want[:len(got)], f"the backend read {got}, the strict reader of the client's bytes {want}"


@pytest.mark.parametrize(("name", "data"), CASES, ids=[c[0] for c in CASES])
def test_case(setup: tuple[LoopThread, EmbeddedProxy, RawBackend], name: str, data: bytes) -> None:
    check(setup, data)


# Found by the fuzz harness (request lines llhttp reads as HTTP/0.9 or lets through with two
# spaces): refused with 400 now, kept here so they stay refused.
FINDINGS = [
    ("http09", b"GET /HTTP/1.1\r\n" + H + b"\r\n"),
    ("request_line_lf", b"GET /w\nX-Y: z HTTP/1.1\r\n" + H + b"\r\n"),
    ("request_line_lf_no_space", b"GET /w\nX:z HTTP/1.1\r\n" + H + b"\r\n"),
    ("request_line_spaces", b"POST /  HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n"),
    ("http09_then_pooled", b"GET /HTTP/1.1\r\n" + H + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n"),
]


@pytest.mark.parametrize(("finding", "data"), FINDINGS, ids=[f[0] for f in FINDINGS])
def test_fuzz_finding(setup: tuple[LoopThread, EmbeddedProxy, RawBackend], finding: str, data: bytes) -> None:
    _, proxy, b = setup
    check(setup, data)
    assert not b.messages, f"{finding}: reached the app as {b.messages}"
    assert _send(proxy.port, data).startswith(b"HTTP/1.1 400 ")
