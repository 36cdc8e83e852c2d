"""HTTP/1.1 wire helpers for the embedded proxy: head rewriting, chunked framing, error responses,
and the check of an app's response heads (what upstream.py refuses, and the reason it logs).

Request heads are validated by llhttp (httptools) first; these helpers then work on the raw head
bytes so that a head is copied into its upstream form once, with unchanged header lines passed
through as they came. Everything here is pure and allocation-light: it runs once per request.
"""

from __future__ import annotations

import re
from http import HTTPStatus

VIA = b"1.1 changeover"
# `changeover drill`: a request with this header and the drill's token goes to the drill route
DRILL_HEADER = b"x-changeover-drill"

# Request header names that need more than pass-through. A head without any of them (the
# common case) takes the fast path: append our forwarding headers and go.
REQ_SPECIAL = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-[!#-'*+.^-z|~0-9-]*|te|trailer|transfer-encoding|content-length"
    rb"|upgrade|x[-_]forwarded[-_](?:for|proto|host)|forwarded|x[-_]real[-_]ip|via|expect"
    rb"|x[-_]changeover[-_]drill):",
    re.IGNORECASE,
)
HOST = re.compile(rb"\r\nhost:[ \t]*([^\r]*?)[ \t]*\r\n", re.IGNORECASE)
# Response headers a proxy drops (hop-by-hop); Connection is read before it is dropped.
RESP_HOP = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-[!#-'*+.^-z|~0-9-]*|te|trailer|upgrade):[^\r]*", re.IGNORECASE
)
RESP_CONNECTION = re.compile(rb"\r\nconnection:[ \t]*([^\r]*)", re.IGNORECASE)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CHUNK_EXT = re.compile(rb"(?:[ \t]*;[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                        rb"(?:=(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+|\"[^\"\\\x00-\x08\x0a-\x1f\x7f]*\"))?)*\Z")
_HEX = frozenset(b"0123456789abcdefABCDEF")
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024


class HttpError(Exception):
    """A request the proxy answers itself (status) without involving the app."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail or HTTPStatus(status).phrase)
        self.status = status


def error_response(status: int, close: bool, head_only: bool = False) -> bytes:
    """A minimal, complete response; cached per (status, close, head_only)."""
    key = (status, close, head_only)
    cached = _ERRORS.get(key)
    if cached is None:
        phrase = HTTPStatus(status).phrase
        body = f"{status} {phrase}\n".encode()
        head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain\r\n"
                f"content-length: {len(body)}\r\n{'connection: close' if close else 'via: 1.1 changeover'}"
                "\r\n\r\n").encode()
        cached = _ERRORS[key] = head if head_only else head + body
    return cached


_ERRORS: dict[tuple[int, bool, bool], bytes] = {}


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


class RequestHead:
    """What the slow path learns from a request head that has special headers."""

    __slots__ = ("chunked", "drill", "expect_continue", "keep_alive", "length", "out", "upgrade")

    def __init__(self) -> None:
        self.length = 0          # Content-Length, 0 when absent
        self.chunked = False
        self.upgrade = False
        self.expect_continue = False
        self.keep_alive = True
        self.out = b""
        self.drill = b""         # the X-Changeover-Drill token (never forwarded to the app)


def rewrite_request(head: bytes, client_ip: bytes, want_upgrade: bool, http11: bool,
                    trusted: bool = False, https: bool = False) -> RequestHead:
    """Full rewrite of a request head (ending in CRLF CRLF) whose framing llhttp already checked.

    Drops hop-by-hop headers (and those named by Connection), appends Via, and applies the checks
    llhttp leaves to us: only a single `chunked` transfer coding is accepted. Forwarding headers
    depend on who sent them: from a `trusted` peer (a proxy or TLS terminator of [proxy]
    trusted_proxies) X-Forwarded-Proto/-Host, Forwarded and X-Real-IP are kept and the client
    address is appended to X-Forwarded-For; from anyone else they are dropped and ours replace
    them, so a client cannot make the app believe another address or scheme.
    """
    r = RequestHead()
    lines = head[:-4].split(b"\r\n")
    named: set[bytes] = set()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"connection":
            named |= connection_tokens(value)
    upgrade = want_upgrade and b"upgrade" in named
    # llhttp's should_keep_alive() is not reliable once a message is complete: decide here
    r.keep_alive = b"close" not in named if http11 else b"keep-alive" in named and b"close" not in named
    out = [lines[0]]
    xff = b""
    host = b""
    seen_host = kept_proto = kept_host = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.lower()
        value = value.strip(b" \t")
        if lname == b"host":
            if host or seen_host:
                raise HttpError(400, "more than one Host")
            host = value
            seen_host = True
        elif lname == b"content-length":
            r.length = int(value)
        elif lname == b"transfer-encoding":
            if value.lower() != b"chunked" or r.chunked:
                raise HttpError(400, "unsupported Transfer-Encoding")
            r.chunked = True
        elif lname == b"x-forwarded-for":
            if trusted:
                xff = xff + b", " + value if xff else value
            continue
        elif lname in _FROM_PROXIES:
            if not trusted:
                continue                  # a client's own claim: the app must not believe it
            kept_proto = kept_proto or lname == b"x-forwarded-proto"
            kept_host = kept_host or lname == b"x-forwarded-host"
        elif lname.replace(b"_", b"-") in _FORWARDED:
            continue                      # X_Forwarded_For would spoof ours in WSGI/CGI
        elif lname.replace(b"_", b"-") == DRILL_HEADER:
            r.drill = value               # the proxy's own: judged by the caller, never forwarded
            continue
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise HttpError(417)
            r.expect_continue = True
        elif lname == b"upgrade":
            if not upgrade:
                continue
        elif lname in _REQ_HOP or lname.startswith(b"proxy-") or lname in named:
            continue
        out.append(line)
    if upgrade:
        out.append(b"Connection: Upgrade")
        r.upgrade = True
    out.append(b"X-Forwarded-For: " + (xff + b", " + client_ip if xff else client_ip))
    if not kept_proto:
        out.append(b"X-Forwarded-Proto: https" if https else b"X-Forwarded-Proto: http")   # https: over TLS
    out.append(b"Via: " + VIA)
    if host and not kept_host:
        out.append(b"X-Forwarded-Host: " + host)
    out.append(b"\r\n")
    r.out = b"\r\n".join(out)
    return r


# kept from a trusted peer only, dropped from anyone else
_FROM_PROXIES = frozenset((b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"))
_ABSOLUTE = re.compile(rb"(?i:https?)://([^/?#@\s]+)([/?][^#\s]*)?\Z")
_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?\Z")


def origin_form(head: bytes) -> bytes:
    """An absolute-form request (`GET http://host/path HTTP/1.1`) in origin-form, with its Host
    header replaced by the URI's authority (RFC 9112 §3.2.2: the URI's host wins). Raises
    HttpError(400) for a target that is not an http(s) URI, userinfo, or several Host headers."""
    lines = head[:-4].split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target, _, version = rest.rpartition(b" ")
    m = _ABSOLUTE.match(target)
    if m is None or not _AUTHORITY.match(m.group(1)):
        raise HttpError(400, "bad request target")
    path = m.group(2) or b"/"
    if path[:1] == b"?":
        path = b"/" + path
    others = [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() != b"host"]
    hosts = len(lines) - 1 - len(others)
    if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):
        raise HttpError(400, "Host")
    return b"\r\n".join([method + b" " + path + b" " + version, b"Host: " + m.group(1), *others]) + b"\r\n\r\n"


_FORWARDED = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"))
_REQ_HOP = frozenset((b"connection", b"keep-alive", b"te", b"trailer", b"upgrade"))


class ChunkScanner:
    """Follows chunked framing over a byte stream without copying the data (bytes pass through).

    Strict: 1-16 hex digits, well-formed extensions, CRLF exactly where required, trailer lines
    that are `token: value`. `feed()` returns the offset just past the last chunk's trailer
    section, or -1 when it needs more bytes; raises HttpError(400) on bad framing and
    HttpError(413) past `limit` body bytes (0 = no limit).
    """

    __slots__ = ("limit", "line", "remaining", "state", "total")

    def __init__(self, limit: int = 0) -> None:
        self.state = 0           # 0 size line, 1 data, 2 CRLF after data, 3 trailers, 4 done
        self.remaining = 0
        self.line = b""
        self.total = 0
        self.limit = limit

    def feed(self, data: bytes, pos: int = 0) -> int:
        n = len(data)
        while pos < n:
            state = self.state
            if state == 1:
                take = min(self.remaining, n - pos)
                self.remaining -= take
                pos += take
                if not self.remaining:
                    self.state = 2
                continue
            if state == 2:
                need = 2 - len(self.line)
                self.line += data[pos:pos + need]
                pos += need
                if len(self.line) < 2:
                    return -1
                if self.line != b"\r\n":
                    raise HttpError(400, "bad chunk terminator")
                self.line = b""
                self.state = 0
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self.line += data[pos:]
                if len(self.line) > (MAX_CHUNK_LINE if state == 0 else MAX_TRAILERS):
                    raise HttpError(400, "chunk line too long")
                return -1
            line = self.line + data[pos:end + 1]
            self.line = b""
            pos = end + 1
            if len(line) < 2 or line[-2] != 13:
                raise HttpError(400, "bare LF in chunked body")
            if state == 0:
                self._size(line[:-2])
            elif line == b"\r\n":
                self.state = 4
                return pos
            else:
                self.total += len(line)
                name, colon, value = line.partition(b":")
                if (not colon or not _TOKEN.match(name) or self.total > MAX_TRAILERS
                        or b"\r" in value[:-2] or b"\x00" in value):
                    raise HttpError(400, "bad trailer")   # a bare CR or NUL would split it further on
        return -1

    def _size(self, line: bytes) -> None:
        i = 0
        while i < len(line) and line[i] in _HEX:
            i += 1
        if i == 0 or i > 16 or not _CHUNK_EXT.match(line, i):
            raise HttpError(400, "bad chunk size")
        size = int(line[:i], 16)
        self.total += size
        if self.limit and self.total > self.limit:
            raise HttpError(413)
        if size:
            self.remaining = size
            self.state = 1
        else:
            self.total = 0       # now counts trailer bytes
            self.state = 3

    @property
    def done(self) -> bool:
        return self.state == 4


# -- response heads (upstream.py) ------------------------------------------------------------
# A response head a client reads only one way (RFC 9112 §4, §5): `HTTP/1.x NNN reason`, then
# `token:value` lines, each ending in CRLF, with no control character but HTAB anywhere. One
# match checks it all: the status line's shape, header names (no colon, a non-token name or an
# obs-fold fail), and every bare CR, bare LF, NUL or other CTL, wherever it is.
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*\r\n"
CLEAN_RESPONSE_HEAD = re.compile(rb"HTTP/1\.[01] [0-9]{3}(?: " + _VALUE + rb"|\r\n)"
                                 rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:" + _VALUE + rb")*\Z")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_COLON = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:")


def bad_response_header(head: bytes) -> str:
    """What is wrong with a refused response head, and in which line (for the log). `head` has
    CRLF line endings and ends with the last line's CRLF (as CLEAN_RESPONSE_HEAD reads it)."""
    lines = head[:-2].split(b"\r\n")
    for k, line in enumerate(lines):
        ctl = _CTL.search(line)
        what = "" if ctl is None else "a bare CR" if ctl[0] == b"\r" else "a NUL" if ctl[0] == b"\x00" else \
            f"a control character {ctl[0]!r}"
        if not what and k and line[:1] in (b" ", b"\t"):
            what, line = "an obs-fold", lines[k - 1]
        if what:
            name = "the status line" if line is lines[0] else \
                f"header {line.partition(b':')[0][:64].decode('latin-1')!r}"
            return f"{what} in {name} of a response"
        if not k and CLEAN_RESPONSE_HEAD.match(line + b"\r\n") is None:
            return f"a malformed status line {line[:64].decode('latin-1')!r}"
        if k and _TOKEN_COLON.match(line) is None:
            return f"a malformed header line {line[:64].decode('latin-1')!r} (no colon, or a name that is not a token)"
    return "a malformed response head"


def drop_header(head: bytes, lname: bytes) -> bytes:
    """head without the header lines named lname (a Connection token): never its status line."""
    lines = head.split(b"\r\n")
    return b"\r\n".join([lines[0], *(ln for ln in lines[1:] if ln.partition(b":")[0].lower() != lname)])
