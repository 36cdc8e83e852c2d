"""HAProxy as changeover's data plane: the config changeover generates for it, and its paths.

This module and haproxy_cli.py (the runtime API's commands and answers, the request log) know
HAProxy's formats; `haproxy_engine.HAProxyControl` uses them to implement the daemon's
`ProxyControl`. Routing lives in HAProxy itself, never in a cache of ours: one backend
`changeover` holds a fixed pool of servers per slot (`blue-1`..`blue-16`, `green-1`..), each
either pointing at one of the slot's upstreams or parked at 127.0.0.1:1 in maintenance. A slot's
routing state is its servers' admin state: `ready` (live: new requests go there), `drain` (just
switched away from: keeps what is in flight, takes nothing new) or `maint` (standby or unused).
So `show servers state` alone says which slot is live and where every slot points, which is what
lets a restarted daemon adopt a running HAProxy without a word of its own state.

Pool servers are declared in the config and re-pointed with `set server ... addr`: dynamic
servers (`add server`) proxied at well under half the speed in HAProxy 2.6, so they are only the
fallback beyond the pool.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from changeover import sockets
from changeover.errors import ChangeoverError
from changeover.proxy.base import ProxySettings

BACKEND = "changeover"
POOL = 16                 # servers declared per slot; `[app] instances` beyond this use `add server`
PARKED_HOST, PARKED_PORT = "127.0.0.1", 1   # where an unused pool server points (nothing listens on 1)
SLOTS = ("blue", "green")
LOG_TAG = "co"            # first field of our per-request log lines; anything else on the socket is ignored
RING = "changeover_log"
RING_SIZE = 1 << 20       # ~15k lines: what a reader may fall behind by before it misses some
CLI_TIMEOUT = 5.0


SETTINGS_MARK = "# changeover settings: "
MAINT = "changeover_maintenance"   # the proc variables the maintenance rule reads (haproxy_engine.maintenance)
MAX_MAINT_PAGE = 8 * 1024          # its page travels base64 on one CLI line, within tune.bufsize
MAINT_RULE = (f'http-request return status 503 content-type "text/html; charset=utf-8" '
              f'lf-string "%[var(proc.{MAINT}_page),b64dec]" hdr Retry-After "%[var(proc.{MAINT}_retry)]" '
              f"hdr Cache-Control no-store if {{ var(proc.{MAINT}) -m int 1 }}")
ROUTING_MARK = f"backend {BACKEND}\n"


@dataclass(frozen=True)
class Paths:
    """Everything changeover keeps for its HAProxy, under `<state dir>/haproxy/`."""

    dir: Path
    config: Path
    admin: Path       # stats socket, level admin, expose-fd listeners (served by the worker)
    master: Path      # master CLI (-S): reload, show proc
    pidfile: Path     # the master's pid (-p)
    output: Path      # HAProxy's own stderr (alerts, "Loading success")

    @classmethod
    def under(cls, directory: Path) -> Paths:
        # HAProxy's sockets go to a short directory when this one is too deep for them, or holds a
        # space, comma or quote its config and `-S path,mode,600` would read differently (sockets.py)
        return cls(directory, directory / "haproxy.cfg",
                   sockets.place(directory, "admin.sock", sockets.HAPROXY_MAX_UNIX_PATH, only_plain=True),
                   sockets.place(directory, "master.sock", sockets.HAPROXY_MAX_UNIX_PATH, only_plain=True),
                   directory / "haproxy.pid", directory.parent / "logs" / "haproxy.log")


# -- config ---------------------------------------------------------------------------------------

def render(settings: ProxySettings, paths: Paths, port: int, routing: Mapping[str, Any] | None) -> str:
    """The whole config: a part that depends on the settings only, then the backend (routing)."""
    return settings_part(settings, paths, port) + routing_part(routing) + mode_part((routing or {}).get("mode"))


def settings_part(settings: ProxySettings, paths: Paths, port: int) -> str:
    s = settings
    host = s.host or "0.0.0.0"
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    trusted = " ".join(s.trusted_proxies) or "255.255.255.255/32"   # an empty list trusts nobody
    limit = (f"    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {s.max_body_bytes} }}\n"
             if s.max_body_bytes else "")
    return f"""{SETTINGS_MARK}{json.dumps(asdict(s), sort_keys=True)}
global
    master-worker
    # one thread: with two, requests sent after a switch was acknowledged still reached the old
    # slot now and then (HAProxy 2.6, 50 keep-alive clients); one thread carries ~50k req/s
    nbthread 1
    stats socket {paths.admin} mode 600 level admin expose-fd listeners
    stats timeout 30s
    log ring@{RING} len 1024 format raw local0 info
    tune.bufsize {max(16384, min(s.max_header_bytes + 1024, 1 << 20))}
    # a reload hands the listeners over; the old worker finishes what it has, up to drain_timeout
    hard-stop-after {_ms(s.drain_timeout)}
# per-request log lines go to a ring in memory, which the daemon follows on the stats socket
# (see haproxy_log.py for why not a socket of its own)
ring {RING}
    format raw
    maxlen 1024
    size {RING_SIZE}
defaults
    mode http
    log global
    option dontlognull
    option http-keep-alive
    # at a reload, idle keep-alive clients get their next answer with Connection: close instead of
    # a connection closed under them (HAProxy's default, which fails requests sent at that instant)
    option idle-close-on-response
    option redispatch 1
    retries {s.retries}
    retry-on conn-failure
    timeout http-request {_ms(s.header_timeout)}
    timeout http-keep-alive {_ms(s.idle_timeout)}
    timeout client {_ms(s.body_timeout)}
    timeout connect {_ms(s.connect_timeout)}
    timeout server {_ms(s.response_timeout)}
    timeout tunnel {_ms(s.tunnel_idle_timeout) if s.tunnel_idle_timeout else "2147483647ms"}
    log-format "{LOG_TAG}|%s|%ST|%[date(0,us),sub(txn.t0)]|%Tr|%ts"
frontend changeover
    bind {bind}
    http-request set-var(txn.t0) date(0,us)
    # `changeover maintenance on`: the page (base64) and Retry-After are set through the runtime API
    {MAINT_RULE}
{limit}    acl trusted src {trusted}
    acl has_xff req.fhdr_cnt(x-forwarded-for) gt 0
    acl one_xff req.fhdr_cnt(x-forwarded-for) eq 1
    # X-Forwarded-*: kept from a trusted peer (a TLS terminator in front), replaced otherwise.
    # Few rules, each header list walked once: these run for every request (bench: µs each).
    http-request del-header x_forwarded_ -m beg
    # (ACLs see the headers as the rules before them left them: append first, then default)
    http-request set-header X-Forwarded-For "%[req.fhdr(x-forwarded-for)], %[src]" if trusted one_xff
    http-request add-header X-Forwarded-For %[src] if trusted has_xff !one_xff
    http-request set-header X-Forwarded-For %[src] unless trusted has_xff
    http-request set-header X-Forwarded-Proto http unless trusted {{ req.hdr(x-forwarded-proto) -m found }}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request add-header Via "1.1 changeover"
    default_backend {BACKEND}
"""


def _ms(seconds: float) -> str:
    return f"{max(1, int(seconds * 1000))}ms"


def routing_part(routing: Mapping[str, Any] | None) -> str:
    """The backend with every slot's pool: upstreams of `routing` in place, the live slot ready."""
    routing = routing or {}
    slots: dict[str, list[tuple[str, int]]] = {name: [] for name in SLOTS}
    for name, upstreams in (routing.get("slots") or {}).items():
        check_slot_name(name)
        slots[name] = [check_upstream(name, u) for u in upstreams]
    live = routing.get("live")
    # like the embedded proxy, idle app connections serve any client (HTTP/1.1 apps are fine with it)
    lines = [ROUTING_MARK, "    balance roundrobin\n", "    http-reuse always\n"]
    for name, upstreams in slots.items():
        for i in range(1, max(POOL, len(upstreams)) + 1):
            if i <= len(upstreams):
                host, port = upstreams[i - 1]
                off = "" if name == live else " disabled"
            else:
                host, port, off = PARKED_HOST, PARKED_PORT, " disabled"
            lines.append(f"    server {name}-{i} {_hostport(host, port)}{off}\n")
    return "".join(lines)


def maintenance_vars(page: bytes, retry_after: int) -> list[tuple[str, str]]:
    """The proc variables the maintenance rule reads, as (name, sample expression)."""
    if len(page) > MAX_MAINT_PAGE:
        raise ChangeoverError(f'maintenance page of {len(page)} bytes: [proxy] engine = "haproxy" serves pages '
                              f"of up to {MAX_MAINT_PAGE} bytes (the embedded proxy up to 1 MiB)")
    # HAProxy escapes control characters in what a log-format writes (%0A): line breaks and tabs
    # go out as spaces, which HTML reads alike (not inside <pre>, nor a // comment in a script)
    encoded = base64.b64encode(page.translate(_SPACES)).decode()
    return [(f"{MAINT}_page", f"str({encoded})"), (f"{MAINT}_retry", f"int({int(retry_after)})"), (MAINT, "int(1)")]


def mode_part(mode: Mapping[str, Any] | None) -> str:
    """Maintenance as the daemon's state has it, set when the config loads: a reload or a fresh
    start would otherwise serve the app until the daemon sets the variables again."""
    m = (mode or {}).get("maintenance")
    if not m:
        return ""
    from changeover.proxy.hold import DEFAULT_PAGE

    page = m.get("page")
    body = DEFAULT_PAGE if page is None else str(page).encode()
    sets = maintenance_vars(body, int(m.get("retry_after", 30)))
    lines = "".join(f"    set-var proc.{name} {expr}\n" for name, expr in sets)
    return f"# `changeover maintenance on` when this config was written\nglobal\n{lines}"


_SPACES = bytes.maketrans(b"\r\n\t", b"   ")


def split_config(text: str) -> tuple[str, str]:
    """(settings part, routing part) of a config written by `render`."""
    head, mark, tail = text.partition("\n" + ROUTING_MARK)   # not `default_backend changeover`
    return head + "\n" if mark else head, mark[1:] + tail


def written_settings(text: str) -> dict[str, Any] | None:
    first = text.split("\n", 1)[0]
    if not first.startswith(SETTINGS_MARK):
        return None
    try:
        return dict(json.loads(first[len(SETTINGS_MARK):]))
    except ValueError:
        return None


def written_port(text: str) -> int | None:
    for line in split_config(text)[0].splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "bind":
            with contextlib.suppress(ValueError):
                return int(words[1].rsplit(":", 1)[1])
    return None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_slot_name(name: object) -> str:
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise ChangeoverError(f"slot name must be letters, digits or _, got {name!r}")
    return name


def check_upstream(slot: str, item: object) -> tuple[str, int]:
    """HAProxy's runtime API takes addresses, not names: resolve `localhost`, refuse the rest."""
    raw_host: object
    raw_port: object
    try:
        raw_host, raw_port = item  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ChangeoverError(f"slot {slot}: upstream {item!r} is not (host, port)") from None
    host = "127.0.0.1" if raw_host == "localhost" else str(raw_host)
    try:
        ipaddress.ip_address(host)
        port = int(raw_port)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ChangeoverError(f"slot {slot}: upstream {item!r} is not (IP address, port)") from None
    if not 0 < port < 65536 or port == PARKED_PORT:
        raise ChangeoverError(f"slot {slot}: upstream {item!r}: port must be 2-65535")
    return str(host), port
