"""Host-based routing for a shared front: which project a request belongs to, by its Host header.

A shared front (proxy/front.py) is one listener that several projects attach to. Each project is
a `Site`: its host names, its own slots (blue, green), its live slot, its drill route and its own
request recorder. The front keeps every site's upstream pools in one dict under names no project
can choose (`blue@<site id>`), so a control request, which only ever names a bare slot, can only
reach the pools of the site its key opened (proxy/front.py).

Host names are matched case-insensitively with the port stripped: an exact name first, then
wildcards from the most specific (`*.shop.example.com` before `*.example.com`; a wildcard matches
subdomains at any depth, never the bare domain), then `*`, a catch-all. What matched is cached
per raw Host value, so a request pays one dict lookup.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from changeover.errors import ChangeoverError
from changeover.monitor.metrics import Recorder
from changeover.proxy.hold import Gate
from changeover.proxy.http1 import HOST
from changeover.proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from changeover.proxy.embedded import EmbeddedProxy

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
HOST_NAME = re.compile(rf"(?:\*|(?:\*\.)?{_LABEL}(?:\.{_LABEL})*)")
CACHE_MAX = 4096


def normalize_host(name: str) -> str:
    """A configured host name in the form it is matched in, or ValueError saying why not."""
    n = name.strip().lower().rstrip(".")
    if not n or len(n) > 253 or not HOST_NAME.fullmatch(n):
        raise ValueError(f"{name!r} is not a host name (expected e.g. \"shop.example.com\", "
                         "\"*.example.com\" or \"*\")")
    return n


def request_host(value: bytes) -> str:
    """The Host header's name part, lowercased: port and IPv6 brackets stripped."""
    v = value.strip().lower()
    if v.startswith(b"["):             # [::1]:8080
        return v[1:].partition(b"]")[0].decode("latin-1")
    v = v.partition(b":")[0]
    return v.rstrip(b".").decode("latin-1")


class Routable(Protocol):
    """What a request is routed by once its host is known."""
    live_slot: UpstreamPool | None
    gate: Gate | None                  # pause or maintenance on (proxy/hold.py)

    def drill_match(self, token: bytes) -> UpstreamPool | None: ...


S = TypeVar("S", bound=Routable)


class Site:
    """One project on a shared front (see the module docstring)."""

    def __init__(self, site_id: str, hosts: tuple[str, ...], recorder: Recorder,
                 proxy: EmbeddedProxy | None = None) -> None:
        self.id = site_id
        self.hosts = hosts
        self.recorder = recorder
        self.proxy = proxy                 # the front's listener (what a Gate reads: loop, retiring)
        self.live_slot: UpstreamPool | None = None
        self.gate: Gate | None = None
        # this project's own pause and maintenance: a Gate reads and sets what it would on a proxy
        self.traffic = Gate(cast("EmbeddedProxy", self))
        self.drill_slot: UpstreamPool | None = None
        self.drill_token = b""
        self.health_ok = True
        self.health_reason = ""

    def pool_name(self, slot: str) -> str:
        if not slot or not isinstance(slot, str) or "@" in slot:
            raise ChangeoverError(f"slot name must be a non-empty string without '@', got {slot!r}")
        return f"{slot}@{self.id}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self.proxy is not None
        return self.proxy.loop

    @property
    def retiring(self) -> bool:
        return self.proxy is not None and self.proxy.retiring

    @property
    def live(self) -> str | None:
        s = self.live_slot
        return None if s is None else bare(s.name)

    def drill_match(self, token: bytes) -> UpstreamPool | None:
        s = self.drill_slot
        if s is None or not hmac.compare_digest(token, self.drill_token):
            return None
        return s


def bare(pool_name: str) -> str:
    """`blue@site` -> `blue`: the slot name a project knows."""
    return pool_name.partition("@")[0]


class HostTable(Generic[S]):
    """Host name -> site (a `Site`, or a project's own proxy), with the lookup cache (see the
    module docstring)."""

    def __init__(self) -> None:
        self.names: dict[str, S] = {}
        self._cache: dict[bytes, S | None] = {}

    def claimant(self, host: str) -> S | None:
        return self.names.get(host)

    def set_hosts(self, site: S, hosts: tuple[str, ...]) -> None:
        """Give `site` exactly `hosts` (claims by other sites are checked by the caller)."""
        for name in [n for n, s in self.names.items() if s is site and n not in hosts]:
            del self.names[name]
        for name in hosts:
            self.names[name] = site
        self._cache.clear()

    def remove(self, site: S) -> None:
        self.set_hosts(site, ())

    def find(self, host: str) -> S | None:
        names = self.names
        site = names.get(host)
        if site is not None:
            return site
        rest = host
        while "." in rest:
            rest = rest.partition(".")[2]
            site = names.get("*." + rest)
            if site is not None:
                return site
        return names.get("*")

    def lookup(self, head: bytes) -> S | None:
        """The site a request head is for; None: no project serves that host (404)."""
        m = HOST.search(head)
        raw = b"" if m is None else m.group(1)
        cache = self._cache
        try:
            return cache[raw]
        except KeyError:
            pass
        site = self.find(request_host(raw)) if raw else self.names.get("*")
        if len(cache) < CACHE_MAX:
            cache[raw] = site
        return site


class FrontRecorder:
    """The front's RequestRecorder: each request is counted by the recorder of the site whose
    pool served it (one dict lookup), so every project's metrics are its own."""

    def __init__(self) -> None:
        self.pools: dict[str, tuple[Recorder, str]] = {}

    def add(self, pool_name: str, recorder: Recorder) -> None:
        self.pools[pool_name] = (recorder, bare(pool_name))

    def discard(self, pool_name: str) -> None:
        self.pools.pop(pool_name, None)

    def record(self, slot: str, status: int, seconds: float, upstream_failed: bool,
               request: bytes | str | None = None) -> None:
        target = self.pools.get(slot)
        if target is not None:
            target[0].record(target[1], status, seconds, upstream_failed, request)
