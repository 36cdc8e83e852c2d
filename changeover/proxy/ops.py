"""The wire protocol between the daemon (`remote.ProxyProcess`) and the proxy worker (`worker`).

One JSON request per connection over `.changeover/proxy.sock` (see `changeover.rpc`). Op names
live here only, and each result has a typed shape, so both sides agree by construction.

`PROTOCOL` (= `control.PROXY_PROTOCOL`) is bumped whenever an op, an argument or a result
changes. A daemon and a worker of different versions never exchange routing ops; the only ops
they use are the *handover ops* (`ping`, `retire`, `shutdown`), frozen across versions: every
worker answers them with the same arguments and at least the fields of `HandoverPing`. That is
what lets a daemon replace a worker of another version without a gap. A worker from before
versioning (its ping has no "protocol") is version 1.

Version 1 (the first embedded worker) differs from 2 only in what 2 adds: `protocol` and
`routing` in the ping result; its other ops take and return the same. A daemon may therefore
drive a version-1 worker until it has replaced it (`ADOPTABLE`). Version 3 adds `set_route`
(the drill route), `set_health` (the load balancer's health check), and `drill` and `health`
in the ping result. Version 4 adds `pause`, `resume`, `maintenance` and `mode`, and `mode` in the ping
result (and in `Routing`, to preload a successor with it).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from changeover.proxy.control import PROXY_PROTOCOL

PROTOCOL = PROXY_PROTOCOL
UNVERSIONED = 1              # what a worker whose ping carries no "protocol" speaks
ADOPTABLE = frozenset((UNVERSIONED,))   # older versions whose routing ops are this one's

# handover ops: frozen, understood by a worker of any version
PING = "ping"
RETIRE = "retire"            # {"timeout": seconds}: stop accepting, finish what is open, exit
SHUTDOWN = "shutdown"        # stop now (changeover down)
HANDOVER_OPS = (PING, RETIRE, SHUTDOWN)

# routing and monitoring ops: only between a daemon and a worker of the same PROTOCOL
SET_SLOT = "set_slot"        # {"slot", "upstreams": [[host, port], ...]}
REMOVE_SLOT = "remove_slot"  # {"slot"}
SET_VERSION = "set_version"  # {"slot", "version"}
SWITCH = "switch"            # {"slot": name | None} -> SwitchResult
DRAIN = "drain"              # {"slot", "timeout"} -> bool (drained cleanly)
DRAIN_REQUESTS = "drain_requests"   # {"slot", "timeout"} -> DrainResult (tunnels get the limit)
METRICS = "metrics"          # {"since": second | None} -> monitor.mirror.export()
SET_ROUTE = "set_route"      # {"route": "drill", "slot": name | None, "token", "fault": {...} | None}
SET_HEALTH = "set_health"    # {"ok": bool, "reason": str}
PAUSE = "pause"              # {"seconds", "max_held": n} -> Mode (proxy/hold.py)
RESUME = "resume"            # {} -> {"released": n}
MAINTENANCE = "maintenance"  # {"on": bool, "page": str | None, "retry_after": seconds} -> Mode
MODE = "mode"                # {} -> Mode: pause and maintenance now (held: every worker's)

OPS = (*HANDOVER_OPS, SET_SLOT, REMOVE_SLOT, SET_VERSION, SWITCH, DRAIN, METRICS, SET_ROUTE, SET_HEALTH,
       PAUSE, RESUME, MAINTENANCE, MODE, DRAIN_REQUESTS)


class DrainResult(TypedDict):
    """`drain_requests`: the slot's requests are done; `tunnels` still open (`websockets` of them
    WebSocket) are closed at the drain limit, `limit_in` seconds from now."""

    clean: bool
    tunnels: int
    websockets: int
    limit_in: float


class Health(TypedDict):
    ok: bool
    reason: str


class Routing(TypedDict):
    """Everything a worker routes by: what a successor is preloaded with before it listens."""

    slots: dict[str, list[list[Any]]]     # slot -> [[host, port], ...]
    versions: dict[str, str]
    live: str | None
    health: NotRequired[Health]           # preloaded into a successor when given (the daemon re-asserts it)
    mode: NotRequired[dict[str, Any]]     # pause / maintenance to preload (see hold.Gate.apply)


class HandoverPing(TypedDict):
    """The frozen part of a ping result."""

    pid: int
    port: int
    live: str | None


class PingResult(HandoverPing):
    protocol: int
    settings: dict[str, Any]              # ProxySettings as a dict
    routing: Routing                      # lets a daemon of another version hand over without the state
    drill: NotRequired[dict[str, Any] | None]   # the drill route: {"slot", "status", "delay"}
    health: NotRequired[Health]           # what the health check answers now
    mode: NotRequired[dict[str, Any]]     # pause and maintenance now: proxy.hold.Gate.mode()
    tls: NotRequired[dict[str, Any] | None]   # the HTTPS listener: port, certificates, reload errors (proxy/tls.py)


class SwitchResult(TypedDict):
    live: str | None
    was: str | None


def protocol_of(ping: dict[str, Any]) -> int:
    """The protocol version a worker speaks, from its ping result."""
    try:
        return int(ping.get("protocol", UNVERSIONED))
    except (TypeError, ValueError):
        return UNVERSIONED
