"""A strict RFC 9112 reader: the backend a fuzz case is judged by.

It accepts only what every reasonable HTTP/1.1 implementation reads the same way: CRLF line
endings, token names with the colon right after them, values without CR, LF or NUL, no
obs-fold, a single decimal Content-Length (identical repeats allowed) or `Transfer-Encoding:
chunked` alone, strictly framed chunks. Anything else raises Ambiguous: a proxy that forwards
such bytes hands the backend something another parser could read differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+\Z")
CHUNK_EXT = re.compile(rb"(?:[ \t]*;[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                       rb"(?:=(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+|\"[^\"\\\x00-\x08\x0a-\x1f\x7f]*\"))?)*\Z")
STATUS_LINE = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: .*)?\Z", re.S)   # a missing reason: read alike
REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^ ]+) HTTP/1\.([01])\Z")
HEX = frozenset(b"0123456789abcdefABCDEF")


class Ambiguous(Exception):
    """Bytes a strict reader refuses."""


class Incomplete(Exception):
    """More bytes are needed."""


@dataclass
class Message:
    start: bytes                         # request line or status line
    headers: list[tuple[bytes, bytes]]   # (lower-case name, value without OWS)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


def _line(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\n", pos)
    if end < 0:
        raise Incomplete
    if end == pos or data[end - 1] != 13:
        raise Ambiguous("bare LF")
    line = data[pos:end - 1]
    if b"\r" in line or b"\x00" in line:
        raise Ambiguous("bare CR or NUL")
    return line, end + 1


def _fields(data: bytes, pos: int) -> tuple[list[tuple[bytes, bytes]], int]:
    out: list[tuple[bytes, bytes]] = []
    while True:
        line, pos = _line(data, pos)
        if not line:
            return out, pos
        if line[:1] in (b" ", b"\t"):
            raise Ambiguous("obs-fold")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.match(name):
            raise Ambiguous(f"bad field line {line[:40]!r}")
        # CR, LF and NUL are refused above; other controls are invalid (RFC 9110 §5.5) but
        # no parser splits a message on them, so they are no desync.
        out.append((name.lower(), value.strip(b" \t")))


def read_chunked(data: bytes, pos: int) -> tuple[bytes, list[tuple[bytes, bytes]], int]:
    """(body, trailers, end) of a chunked body starting at pos."""
    body: list[bytes] = []
    while True:
        line, pos = _line(data, pos)
        i = 0
        while i < len(line) and line[i] in HEX:
            i += 1
        if i == 0 or i > 16 or not CHUNK_EXT.match(line, i):
            raise Ambiguous(f"bad chunk size line {line[:40]!r}")
        size = int(line[:i], 16)
        if size == 0:
            trailers, pos = _fields(data, pos)
            return b"".join(body), trailers, pos
        if len(data) < pos + size + 2:
            raise Incomplete
        body.append(data[pos:pos + size])
        pos += size
        if data[pos:pos + 2] != b"\r\n":
            raise Ambiguous("chunk data longer than its size")
        pos += 2


def _framing(m: Message, http11: bool) -> tuple[str, int]:
    te, cl = m.get(b"transfer-encoding"), m.get(b"content-length")
    if te:
        if cl or len(te) > 1 or te[0].lower() != b"chunked" or not http11:
            raise Ambiguous("Transfer-Encoding other than a single chunked, or with Content-Length")
        return "chunked", 0
    if cl:
        if len(set(cl)) > 1 or not cl[0].isdigit() or not cl[0].isascii():
            raise Ambiguous("Content-Length not a single decimal")
        return "length", int(cl[0])
    return "none", 0


def read_request(data: bytes, pos: int = 0) -> tuple[Message, int]:
    line, pos = _line(data, pos)
    rl = REQUEST_LINE.match(line)
    if rl is None or not TARGET.match(rl.group(2)):
        raise Ambiguous(f"bad request line {line[:60]!r}")
    headers, pos = _fields(data, pos)
    m = Message(line, headers)
    hosts = m.get(b"host")
    if len(hosts) > 1 or (rl.group(3) == b"1" and not hosts):
        raise Ambiguous("Host missing or repeated")
    kind, n = _framing(m, rl.group(3) == b"1")
    if kind == "chunked":
        m.body, m.trailers, pos = read_chunked(data, pos)
    elif kind == "length":
        if len(data) < pos + n:
            raise Incomplete
        m.body, pos = data[pos:pos + n], pos + n
    return m, pos


def read_requests(data: bytes) -> tuple[list[Message], bytes | None]:
    """Every complete request in data, and why reading stopped: None when the bytes ended
    cleanly (or in the middle of a request), else the reason they were refused."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        try:
            m, pos = read_request(data, pos)
        except Incomplete:
            return out, None
        except Ambiguous as e:
            return out, str(e).encode()
        out.append(m)
    return out, None


def read_response_head(data: bytes) -> tuple[Message, int]:
    line, pos = _line(data, 0)
    if not STATUS_LINE.match(line):
        raise Ambiguous(f"bad status line {line[:60]!r}")
    headers, pos = _fields(data, pos)
    m = Message(line, headers)
    if m.get(b"transfer-encoding") and m.get(b"content-length"):
        raise Ambiguous("Transfer-Encoding with Content-Length")
    cl = m.get(b"content-length")
    if cl and (len(set(cl)) > 1 or not cl[0].isdigit() or not cl[0].isascii()):
        raise Ambiguous("Content-Length not a single decimal")
    return m, pos
