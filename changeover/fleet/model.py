"""What the fleet keeps in etcd, and how a host decides what to do about it.

Keys, under `/changeover/<prefix>/`:

    lock              the fleet deploy lock, attached to the coordinator's lease: a coordinator that
                      dies stops refreshing it and etcd deletes it (no stale lock, ever)
    desired           the desired state (`Desired`): ONE key every daemon watches; the switch of the
                      whole fleet is one write of it
    hosts/<name>      each host's state, attached to its own lease (a heartbeat): gone when the host
                      has been cut off for `host_ttl`
    events/<name>     each host's latest step event (every revision is streamed to the coordinator)
    deploys/<id>      the record of a fleet deployment, for `history`

A host never acts on its own: it compares `desired` with what it runs and calls its own daemon's
phase verbs (`decide`). Cut off from etcd it keeps serving what it has and reports itself out
of sync; back, it decides again from the desired state as it is then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from changeover.fleet.config import FleetConfig

# desired actions
PREPARE, SWITCH, PROMOTE, ABORT, ROLLBACK = "prepare", "switch", "promote", "abort", "rollback"
ACTIONS = (PREPARE, SWITCH, PROMOTE, ABORT, ROLLBACK)
FOLLOW = "follow"    # a host's verb: report a switched deployment its daemon resumed after a restart
REPORT = "report"    # a host's verb: its own trigger rolled it back before the fleet heard; tell it now


async def fault_pause(point: str) -> None:
    """CHANGEOVER_TEST_FLEET_PAUSE="barrier:30,switch:30": wait that long at that point (the
    coordinator after the barrier / after the switch write; a host's agent at `rolled_back`,
    between its own rollback and telling the fleet), so fault tests can kill a process there."""
    for part in os.environ.get("CHANGEOVER_TEST_FLEET_PAUSE", "").split(","):
        name, _, secs = part.partition(":")
        if name.strip() == point and secs:
            await asyncio.sleep(float(secs))


class Keys:
    def __init__(self, cfg: FleetConfig) -> None:
        self.root = cfg.root
        self.lock = self.root + "lock"
        self.desired = self.root + "desired"
        self.hosts = self.root + "hosts/"
        self.events = self.root + "events/"
        self.deploys = self.root + "deploys/"

    def host(self, name: str) -> str:
        return self.hosts + name

    def event(self, name: str) -> str:
        return self.events + name

    def deploy(self, dep_id: str) -> str:
        return self.deploys + dep_id

    def name_of(self, key: str) -> str:
        return key.rsplit("/", 1)[-1]


def new_id() -> str:
    """Sortable by time, unique across coordinators."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class Desired:
    id: str                         # the fleet deployment this is about
    action: str                     # prepare | switch | promote | abort | rollback
    version: str                    # the release being deployed
    previous: str | None            # what was live before it (where abort and rollback go)
    path: str
    env: dict[str, str] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    by: str = ""
    at: float = 0.0
    reason: str | None = None
    held: bool = False              # prepared by `deploy --no-switch`: waits for `switch`
    fired_by: str | None = None     # the host whose trigger rolled the fleet back
    evidence: Any = None

    @property
    def live(self) -> str | None:
        """The release users should reach now."""
        return self.version if self.action in (SWITCH, PROMOTE) else self.previous

    def but(self, **changes: Any) -> Desired:
        return dataclasses.replace(self, at=time.time(), **changes)

    def wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> Desired | None:
        if not isinstance(data, dict) or data.get("action") not in ACTIONS:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Facts:
    """What a host runs now, as its daemon knows it."""

    live: str | None                # the live slot's version
    active: str | None              # the version of the active local deployment
    phase: str | None               # its phase: running | prepared | observing | rolling_back
    busy: bool                      # a fleet verb (prepare, switch) is running on this host
    rolled_back: str | None = None  # the release this host's own trigger rolled back, for this deployment


def decide(d: Desired, f: Facts, done: set[str]) -> str | None:
    """The one verb this host should call now for the desired state, or None. `done` holds
    "<id>:<verb>" of the verbs already called for it (each is called once per desired state)."""
    mine = f.active is not None and f.active == d.version

    def once(verb: str) -> str | None:
        return None if f"{d.id}:{verb}" in done else verb

    if d.action == PREPARE:
        if f.busy or f.active is not None:
            return None
        return once(PREPARE)
    if d.action in (SWITCH, PROMOTE):
        if f.rolled_back == d.version and f.active is None and not f.busy:
            # This host judged the release bad and rolled itself back, then restarted before the
            # fleet heard: it never converges to it again; it rolls the fleet back (once).
            return once(REPORT)
        if mine and f.phase == "prepared" and not f.busy:
            return once(SWITCH)
        if mine and f.phase == "observing" and d.action == PROMOTE:
            return once(PROMOTE)
        if not f.busy and ((mine and f.phase == "observing") or (f.active is None and f.live == d.version)) \
                and not {f"{d.id}:{SWITCH}", f"{d.id}:converge"} & done:
            # Switched by a daemon before this one (restarted mid-deploy, it carried the deployment
            # on, or already finished it): report its outcome as this host's switch.
            return once(FOLLOW)
        if f.live == d.version or mine or f.busy or f.active is not None:
            return None
        # Back from a partition without the release prepared: prepare it and switch (converge).
        return once("converge")
    if d.action == ABORT:
        if mine and f.phase in ("running", "prepared", "observing"):
            return once(ABORT)
        return None
    if d.action == ROLLBACK:
        if mine and f.phase in ("running", "prepared", "observing"):
            return once(ABORT)    # a deployment in flight is unwound: after its switch that is a rollback
        if f.active is None and f.live == d.version and d.previous not in (None, d.version):
            return once(ROLLBACK)
        return None
    return None
