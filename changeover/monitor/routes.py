"""Requests grouped by route: method + path template, bounded in number.

The proxy hands the recorder the raw request line ("GET /cart/42?x=1 HTTP/1.1..."); this module
turns it into a route key ("GET /cart/{id}"): the query is dropped and path segments that are
ids are collapsed - numbers, UUIDs, long hex strings and long tokens mixing letters and digits.
What that leaves apart (slugs, user names) can be grouped with `[monitor] routes` patterns,
where `*` stands for one path segment and a trailing `**` for the rest of the path:

    routes = ["GET /shop/*", "/api/v1/users/*/orders", "/static/**"]

A pattern without a method matches every method. The number of routes per slot is bounded
(`max_routes`); requests of any further route are counted under OTHER, so a path scan cannot
grow memory. Keys are computed once per distinct raw path (a bounded cache), not per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OTHER = "(other)"
MAX_KEY = 200                 # characters of a route key kept (a huge path is still one route)
CACHE = 4096                  # distinct raw "METHOD path" strings remembered per rule set

_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_NUM = re.compile(r"[0-9][0-9_.,:-]*")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,}")


def collapse_segment(seg: str) -> str:
    if not seg:
        return seg
    if _NUM.fullmatch(seg) or _UUID.fullmatch(seg) or _HEX.fullmatch(seg):
        return "{id}"
    if _TOKEN.fullmatch(seg) and any(c.isdigit() for c in seg) and any(c.isalpha() for c in seg):
        return "{id}"
    return seg


def template(method: str, path: str) -> str:
    """'GET', '/users/42/orders?x=1' -> 'GET /users/{id}/orders'."""
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    if not path.startswith("/"):
        path = "/" + path.split("/", 3)[-1] if "://" in path else "/" + path   # absolute-form
    return f"{method} {'/'.join(collapse_segment(s) for s in path.split('/'))}"[:MAX_KEY]


@dataclass(frozen=True)
class Pattern:
    text: str
    method: str | None
    segments: tuple[str, ...]
    rest: bool                # ends with ** : matches any deeper path

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """Raises ValueError with what is wrong (config turns it into a ConfigError)."""
        method, sep, path = text.strip().partition(" ")
        if not sep:
            method, path = "", method
        if not path.startswith("/"):
            raise ValueError("a path starting with '/', optionally after a method: 'GET /shop/*'")
        if method and not method.isalpha():
            raise ValueError(f"{method!r} is not an HTTP method")
        segs = path.split("/")[1:]
        rest = bool(segs) and segs[-1] == "**"
        if rest:
            segs = segs[:-1]
        if "**" in segs:
            raise ValueError("'**' only as the last segment")
        return cls(text.strip(), method.upper() or None, tuple(segs), rest)

    def matches(self, method: str, segs: list[str]) -> bool:
        if self.method is not None and self.method != method:
            return False
        if len(segs) < len(self.segments) or (not self.rest and len(segs) != len(self.segments)):
            return False
        return all(p == "*" or p == s for p, s in zip(self.segments, segs, strict=False))


class RouteRules:
    """Raw request line -> route key. One per recorder; the daemon's applies the config patterns."""

    def __init__(self, patterns: tuple[str, ...] = (), max_routes: int = 32) -> None:
        self.patterns = tuple(Pattern.parse(p) for p in patterns)
        self.max_routes = max_routes
        self._cache: dict[bytes | str, str] = {}

    def key(self, request: bytes | str) -> str:
        """The route of a request line ('GET /a/1 HTTP/1.1...', or just 'GET /a/1')."""
        k = self._cache.get(request)
        if k is not None:
            return k
        text = request.decode("latin-1") if isinstance(request, bytes) else request
        line = text.split("\r", 1)[0].split("\n", 1)[0]
        method, _, rest = line.partition(" ")
        k = self.rekey(template(method.upper(), rest.split(" ", 1)[0]))
        if len(self._cache) >= CACHE:
            self._cache.clear()     # a path scan: start over rather than grow
        self._cache[request] = k
        return k

    def rekey(self, key: str) -> str:
        """A route key as another recorder made it, under these rules' patterns."""
        if not self.patterns or key == OTHER:
            return key
        method, _, path = key.partition(" ")
        segs = path.split("/")[1:]
        for p in self.patterns:
            if p.matches(method, segs):
                return p.text if p.method else f"{method} {p.text}"
        return key
