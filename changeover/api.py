"""The typed control API of the daemon: what the CLI, the dashboard and the fleet coordinator send.

Transport: `rpc` (JSON lines over `.changeover/control.sock`), one request per connection, any
number of events, then one result. Every request carries `PROTOCOL`; a daemon of another
version refuses it with a clear error instead of misreading it.

The phase verbs (a fleet coordinator runs "prepare everywhere, then switch everywhere"):

    PREPARE   pre-checks, expand migrations, start the idle slot, private verification; nothing
              users see changes. The deployment is then `prepared` and holds the deploy lock.
    SWITCH    the prepared release goes live; verification through the proxy; observation follows.
    PROMOTE   end the observation window now and finalise.
    ABORT     unwind the active deployment: before the switch nothing changes, after it traffic
              goes back to the old slot.
    DEPLOY    prepare + switch + observe + finalise (`no_switch` stops after prepare).
    ROLLBACK  back to the previous release (warm: one switch; cold: prepared, verified, observed).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, get_type_hints

from changeover.errors import UsageError

PROTOCOL = 2


class Op(StrEnum):
    PING = "ping"
    STATUS = "status"
    HISTORY = "history"
    METRICS = "metrics"
    DEPLOY = "deploy"
    PREPARE = "prepare"
    SWITCH = "switch"
    PROMOTE = "promote"
    ABORT = "abort"
    ROLLBACK = "rollback"
    STOP_STANDBY = "stop_standby"
    RELOAD = "reload"               # re-read changeover.toml for the running daemon
    RELOAD_PROXY = "reload_proxy"   # hand traffic to a new proxy worker
    DOWN = "down"
    SERIES = "series"               # read-only: per-second traffic per slot (the dashboard)
    RELEASES = "releases"           # read-only: releases deployed, with their paths (the dashboard)
    DRILL = "drill"                 # rehearse every rollback path on a drill copy (daemon/drill.py)
    PAUSE = "pause"                 # hold new requests briefly, released in order (daemon/traffic.py)
    RESUME = "resume"               # release what a pause holds
    MAINTENANCE = "maintenance"     # 503 with a page and Retry-After for every request, or back to serving


A = TypeVar("A")


def decode(cls: type[A], data: dict[str, Any] | None) -> A:
    """Build an argument dataclass from the wire, refusing unknown keys and wrong types."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown argument(s) {', '.join(sorted(unknown))}")
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise UsageError(f"{cls.__name__}.{name}: expected {hints[name]}, got {type(value).__name__}")
    return cls(**data)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        kt, vt = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, kt) and _fits(v, vt) for k, v in value.items())
    if origin is list:
        (it,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, it) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def encode(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# -- arguments ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeployArgs:
    version: str
    path: str
    wait: bool = False
    env: dict[str, str] = field(default_factory=dict)
    actor: str | None = None
    no_switch: bool = False
    git: str | None = None          # export this revision into releases/VERSION (path is then "")
    archive: str | None = None      # or unpack this .tar.gz (an absolute path on the daemon's host)


@dataclass(frozen=True)
class SwitchArgs:
    wait: bool = False
    actor: str | None = None


@dataclass(frozen=True)
class PromoteArgs:
    actor: str | None = None


@dataclass(frozen=True)
class AbortArgs:
    reason: str | None = None
    actor: str | None = None


@dataclass(frozen=True)
class RollbackArgs:
    reason: str | None = None
    actor: str | None = None
    schema: bool = False
    allow_data_loss: bool = False
    wait: bool = True


@dataclass(frozen=True)
class HistoryArgs:
    limit: int = 20
    traffic: bool = False           # also pause / resume / maintenance events (rows with id None)


@dataclass(frozen=True)
class PauseArgs:
    timeout: float | None = None    # seconds (default [proxy] pause_timeout); then it resumes by itself
    actor: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ResumeArgs:
    actor: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class MaintenanceArgs:
    on: bool
    page: str | None = None         # an HTML file on the daemon's host (default [proxy] maintenance_page)
    retry_after: int | None = None  # seconds (default [proxy] retry_after)
    actor: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ReloadProxyArgs:
    why: str | None = None


@dataclass(frozen=True)
class SeriesArgs:
    seconds: int = 600


@dataclass(frozen=True)
class DrillArgs:
    actor: str | None = None
    max_reaction: float | None = None   # seconds a trigger may take to fire (default 30)


@dataclass(frozen=True)
class Empty:
    pass


ARGS: dict[Op, type[Any]] = {
    Op.DEPLOY: DeployArgs, Op.PREPARE: DeployArgs, Op.SWITCH: SwitchArgs, Op.PROMOTE: PromoteArgs,
    Op.ABORT: AbortArgs, Op.ROLLBACK: RollbackArgs, Op.HISTORY: HistoryArgs, Op.RELOAD_PROXY: ReloadProxyArgs,
    Op.PING: Empty, Op.STATUS: Empty, Op.METRICS: Empty, Op.STOP_STANDBY: Empty, Op.RELOAD: Empty,
    Op.DOWN: Empty,
    Op.SERIES: SeriesArgs, Op.RELEASES: Empty,
    Op.DRILL: DrillArgs,
    Op.PAUSE: PauseArgs, Op.RESUME: ResumeArgs, Op.MAINTENANCE: MaintenanceArgs,
}


# -- events (streamed while a verb runs) --------------------------------------------------------
@dataclass(frozen=True)
class PlanEvent:
    deployment: int
    version: str
    slot: str
    live: str | None
    type: str = "plan"


@dataclass(frozen=True)
class StepEvent:
    name: str
    kind: str
    state: str                      # running | ok | failed | skipped
    duration: float | None = None
    detail: str | None = None
    type: str = "step"


@dataclass(frozen=True)
class CheckEvent:
    name: str
    ok: bool
    detail: str | None = None
    duration: float | None = None
    type: str = "check"


@dataclass(frozen=True)
class LiveEvent:
    version: str | None
    slot: str | None
    switch_ms: float
    type: str = "live"


@dataclass(frozen=True)
class OutputEvent:
    """A line of a build's output (daemon/build_steps.py), as it is written."""

    name: str
    line: str
    type: str = "output"


EVENTS: dict[str, type[Any]] = {"plan": PlanEvent, "step": StepEvent, "check": CheckEvent, "live": LiveEvent,
                                "output": OutputEvent}


def event(data: dict[str, Any]) -> Any:
    """A wire event as its dataclass (unknown kinds and extra keys are kept as the dict: newer
    daemons may add them)."""
    cls = EVENTS.get(str(data.get("type")))
    if cls is None:
        return data
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# -- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeploymentResult:
    """What a deploy, prepare, switch, promote, abort or rollback returns."""

    state: str                      # daemon.model.DeploymentState, or "live" (returned at the switch)
    deployment: int
    kind: str
    version: str | None
    slot: str | None
    switch_ms: float | None = None
    observing: bool = False
    promoted: bool = False
    reason: str | None = None
    message: str | None = None
    live: str | None = None
    live_version: str | None = None
    from_version: str | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> DeploymentResult:
        data = dict(data)
        data["from_version"] = data.pop("from", data.get("from_version"))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
