"""Pipelined requests of every framing, cut at arbitrary points on the wire: every answer intact."""

from __future__ import annotations

import itertools
import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, raw, read_response


def _request(kind: str, body: bytes) -> tuple[bytes, bytes]:
    if kind == "get":
        return b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", b"blue"
    if kind == "cl":
        return b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    return (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n",
            body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(st.tuples(st.sampled_from(["get", "cl", "chunked"]), st.binary(min_size=1, max_size=40)),
                     min_size=1, max_size=5),
       cuts=st.lists(st.integers(1, 600), max_size=6))
def test_pipelined_requests_cut_anywhere(proxy: EmbeddedProxy, backends: tuple[Backend, Backend],
                                         reqs: list[tuple[str, bytes]], cuts: list[int]) -> None:
    wire = b""
    expected = []
    for kind, body in reqs:
        data, answer = _request(kind, body)
        wire += data
        expected.append(answer)
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    with raw(proxy.port) as s:
        s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in itertools.pairwise(points):
            s.sendall(wire[a:b])
            time.sleep(0.002)             # let each piece arrive on its own
        for answer in expected:
            status, _, body = read_response(s)
            assert (status, body) == (200, answer)


class _Dribble:
    """An app that answers each request with `reply` written in pieces, a loop turn or two apart."""

    def __init__(self, reply: bytes, cuts: list[int], close: bool) -> None:
        self.reply, self.cuts, self.close = reply, cuts, close

    def __call__(self) -> object:
        import asyncio

        outer = self

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                if b"\r\n\r\n" in self.buf:
                    self.buf = b""
                    asyncio.get_running_loop().create_task(self.send())

            async def send(self) -> None:
                points = sorted({min(c, len(outer.reply)) for c in outer.cuts} | {0, len(outer.reply)})
                for a, b in itertools.pairwise(points):
                    self.t.write(outer.reply[a:b])  # type: ignore[attr-defined]
                    await asyncio.sleep(0.001)
                if outer.close:
                    self.t.close()
        return Proto()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300), framing=st.sampled_from(["cl", "chunked", "close"]),
       cuts=st.lists(st.integers(1, 400), max_size=6))
def test_responses_cut_anywhere(lt: object, proxy: EmbeddedProxy, body: bytes, framing: str,
                                cuts: list[int]) -> None:
    if framing == "cl":
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    elif framing == "chunked":
        reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"".join(b"%x;e=1\r\n%s\r\n" % (len(body[i:i + 50]), body[i:i + 50])
                            for i in range(0, len(body), 50))
                 + b"0\r\nX-Trailer: 1\r\n\r\n")
    else:
        reply = b"HTTP/1.1 200 OK\r\n\r\n" + body
    server = lt.run(_start(_Dribble(reply, cuts, framing == "close")))  # type: ignore[attr-defined]
    lt.call(proxy.set_slot, "blue", [("127.0.0.1", server.sockets[0].getsockname()[1])])  # type: ignore[attr-defined]
    try:
        with raw(proxy.port) as s:
            for _ in range(1 if framing == "close" else 2):
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                status, _, got = read_response(s)
                assert (status, got) == (200, body)
    finally:
        server.close()


async def _start(factory: object) -> object:
    import asyncio
    return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)  # type: ignore[arg-type]
