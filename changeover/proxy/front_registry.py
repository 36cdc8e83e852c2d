"""The shared front's sites: who each belongs to (`Member`), the proxy that routes them by Host
(`FrontProxy`), and the registry the front keeps of them in a JSON file next to its socket, so a
front started again after a crash routes every project from its first connection (front.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

from changeover.errors import ChangeoverError, ConfigError
from changeover.monitor.metrics import Recorder
from changeover.monitor.routes import RouteRules
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.routes import FrontRecorder, HostTable, Site, bare
from changeover.proxy.upstream import UpstreamPool

log = logging.getLogger("changeover.proxy.front")


@dataclasses.dataclass
class Member:
    """A site and who it belongs to."""
    site: Site
    project: str          # the state directory
    config: str           # its changeover.toml, for messages
    uid: int
    key_hash: str
    routes: tuple[str, ...]
    max_routes: int
    tls: dict[str, Any] | None = None   # the project's [proxy.tls] (wire form): its certificates


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def site_id(project: str) -> str:
    return hashlib.sha256(project.encode()).hexdigest()[:12]


class FrontProxy(EmbeddedProxy):
    """The embedded proxy with host routing on: every pool of every site is in `slots`."""

    def __init__(self, settings: ProxySettings) -> None:
        self.front_recorder = FrontRecorder()
        super().__init__(settings, self.front_recorder, reuse_port=True)
        self.table: HostTable[Site] = HostTable()
        self.sites = self.table            # host routing on (read per request by proxy/client.py)
        self.members: dict[str, Member] = {}

    def health(self) -> tuple[bool, dict[str, object]]:
        """200 while every attached project has a live slot."""
        down = sorted(m.config for m in self.members.values()
                      if m.site.live_slot is None or not m.site.live_slot.upstreams)
        ok = self.health_ok and bool(self.members) and not down
        body: dict[str, object] = {"ok": ok, "sites": len(self.members)}
        if down:
            body["reason"] = "nothing is live for " + ", ".join(down)
        return ok, body


class Registry:
    """The sites of a front and their routes, and the registry file (front.py's `Front`)."""

    proxy: FrontProxy
    registry: Path
    settings: ProxySettings

    # -- the registry --------------------------------------------------------------------------
    def load(self) -> None:
        """Sites and routing from the registry, before the port is bound."""
        try:
            data = json.loads(self.registry.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("cannot read the front's registry %s (%s): starting with no sites", self.registry, e)
            return
        for sid, m in data.get("sites", {}).items():
            if not os.path.isdir(m["project"]):     # the project is gone (deleted without `down`)
                log.warning("site %s (%s): %s no longer exists, dropped", sid, m["config"], m["project"])
                continue
            member = self._member(sid, m["project"], m["config"], int(m["uid"]), m["key_hash"],
                                  tuple(m.get("routes") or ()), int(m.get("max_routes") or 32))
            member.tls = m.get("tls")
            if isinstance(m.get("mode"), dict):
                member.site.traffic.apply(m["mode"])
            self._claim(member, tuple(m.get("hosts") or ()))
            self._load_routing(member, m.get("routing") or {})

    def save(self) -> None:
        sites = {sid: {"project": m.project, "config": m.config, "uid": m.uid, "key_hash": m.key_hash,
                       "hosts": list(m.site.hosts), "routes": list(m.routes), "max_routes": m.max_routes,
                       "routing": self.routing(m), "tls": m.tls, "mode": m.site.traffic.wire()}
                 for sid, m in self.proxy.members.items()}
        tmp = self.registry.with_name(self.registry.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"settings": dataclasses.asdict(self.settings), "sites": sites}, f)
        os.replace(tmp, self.registry)

    def routing(self, m: Member) -> dict[str, Any]:
        pools = self._pools(m)
        return {"slots": {bare(n): [[u.host, u.port] for u in p.upstreams] for n, p in pools.items()},
                "versions": {bare(n): m.site.recorder.version(bare(n)) for n in pools},
                "live": m.site.live}

    def _pools(self, m: Member) -> dict[str, UpstreamPool]:
        suffix = "@" + m.site.id
        return {n: p for n, p in self.proxy.slots.items() if n.endswith(suffix)}

    def _member(self, sid: str, project: str, config: str, uid: int, khash: str,
                routes: tuple[str, ...], max_routes: int) -> Member:
        site = Site(sid, (), Recorder(routes=RouteRules(routes, max_routes)), self.proxy)
        member = Member(site, project, config, uid, khash, routes, max_routes)
        self.proxy.members[sid] = member
        return member

    def _claim(self, member: Member, hosts: tuple[str, ...]) -> None:
        for h in hosts:
            other = self.proxy.table.claimant(h)
            if other is not None and other is not member.site and \
                    not os.path.isdir(self.proxy.members[other.id].project):
                gone = self.proxy.members[other.id]
                log.warning("site %s (%s): %s no longer exists, its routes are dropped", other.id, gone.config,
                            gone.project)
                self._detach(gone)
                other = None
            if other is not None and other is not member.site:
                theirs = self.proxy.members[other.id].config
                raise ConfigError(f"host {h!r} is already routed by the shared front on {self.settings.listen} to "
                                  f"the project of {theirs}; {member.config} cannot claim it (remove it from one "
                                  "of the two [proxy] hosts lists)", file=member.config, key="proxy.hosts")
        self.proxy.table.set_hosts(member.site, hosts)
        member.site.hosts = hosts

    def _load_routing(self, m: Member, routing: dict[str, Any]) -> None:
        for slot, ups in (routing.get("slots") or {}).items():
            self._set_slot(m, slot, ups)
        for slot, version in (routing.get("versions") or {}).items():
            m.site.recorder.set_version(slot, str(version or ""))
        self._switch(m, routing.get("live"))

    # -- a site's routes -------------------------------------------------------------------------
    def _set_slot(self, m: Member, slot: str, upstreams: list[Any]) -> None:
        name = m.site.pool_name(slot)
        self.proxy.set_slot(name, [(str(h), int(p)) for h, p in upstreams])
        self.proxy.front_recorder.add(name, m.site.recorder)

    def _switch(self, m: Member, slot: str | None) -> None:
        if slot is None:
            m.site.live_slot = None
            return
        pool = self.proxy.slots.get(m.site.pool_name(slot))
        if pool is None:
            known = ", ".join(sorted(bare(n) for n in self._pools(m))) or "none"
            raise ChangeoverError(f"unknown slot {slot!r} (known: {known})")
        m.site.live_slot = pool

    def _remove_slot(self, m: Member, slot: str) -> None:
        name = m.site.pool_name(slot)
        pool = self.proxy.slots.get(name)
        if pool is None:
            return
        if pool is m.site.live_slot:
            raise ChangeoverError(f"slot {slot} is live; switch away from it before removing it")
        if pool is m.site.drill_slot:
            m.site.drill_slot, m.site.drill_token = None, b""
        self.proxy.remove_slot(name)
        self.proxy.front_recorder.discard(name)

    def _detach(self, m: Member) -> None:
        m.site.live_slot = m.site.drill_slot = None
        for name in list(self._pools(m)):
            self.proxy.remove_slot(name)
            self.proxy.front_recorder.discard(name)
        self.proxy.table.remove(m.site)
        del self.proxy.members[m.site.id]

    def _site(self, args: dict[str, Any], uid: int) -> Member:
        """The one site the request's key opens; every route op goes through here."""
        h = key_hash(str(args.get("key") or ""))
        for m in self.proxy.members.values():
            if hmac.compare_digest(m.key_hash, h):
                if uid not in (m.uid, 0):
                    raise ChangeoverError(f"refused: the project of {m.config} belongs to uid {m.uid}, not {uid}")
                return m
        raise ChangeoverError("refused: this key opens no project on the shared front (attach first)")
