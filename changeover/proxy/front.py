"""The shared front: one proxy process on a port (80, 443) that several projects attach to.

Each project (its own changeover.toml, its own daemon) registers its host names and then drives
only its own routes (proxy/shared.py is the daemon's side). Isolation is by construction:

- a project attaches with its state directory and a secret kept 0600 in it (`front.key`); the
  front keeps a hash of the secret and the caller's uid (SO_PEERCRED), and refuses to register a
  state directory the caller does not own;
- every later request carries the secret, and the secret alone picks the site: route requests
  name a bare slot ("blue"), which the front maps into that site's own pools (proxy/routes.py),
  so no request can even name another project's routes;
- a host name claimed by one project is refused to every other, naming both config files.

The front outlives every daemon (it runs in its own session) and keeps its registry (sites,
hosts, routing) in a JSON file next to its socket, so a front that is started again after a crash
routes every project from its first connection, and a daemon that comes back adopts its site.
`handover` replaces the front process by a new one on the same port without a failed request
(SO_REUSEPORT, as proxy/worker.py does).

    python -m changeover.proxy.front --socket PATH --registry PATH --settings JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from changeover.daemon.logs import bound_own_log
from changeover.errors import ChangeoverError, ConfigError
from changeover.monitor import mirror
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import ListenError
from changeover.proxy.front_registry import FrontProxy, Member, Registry, key_hash, site_id
from changeover.proxy.front_tls import FrontTls
from changeover.proxy.front_wire import FRONT_PROTOCOL, MOVED, Handler, serve, settings_from_json, start_front
from changeover.proxy.routes import bare

log = logging.getLogger("changeover.proxy.front")



class Front(Registry):
    def __init__(self, socket_path: Path, registry: Path, settings: ProxySettings,
                 bind_path: Path | None = None) -> None:
        self.socket_path = socket_path     # where projects find it (a successor binds next to it first)
        self.bind_path = bind_path or socket_path
        self.registry = registry
        self.settings = settings
        self.proxy = FrontProxy(settings)
        self.https = FrontTls(self.proxy)
        self.stopped = asyncio.Event()
        self.lock = asyncio.Lock()       # registry changes, and a handover, one at a time
        self.moved = False
        self.ready = False
        self._retiring: asyncio.Task[None] | None = None

    # -- ops -----------------------------------------------------------------------------------
    def handlers(self) -> dict[str, Handler]:
        return {"ping": self.ping, "attach": self.attach, "detach": self.detach, "handover": self.handover,
                "shutdown": self.shutdown, "set_slot": self.set_slot, "remove_slot": self.remove_slot,
                "set_version": self.set_version, "switch": self.switch, "drain": self.drain,
                "metrics": self.metrics, "set_route": self.set_route, "set_health": self.set_health,
                "pause": self.pause, "resume": self.resume, "maintenance": self.maintenance, "mode": self.mode}

    async def ping(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pid": os.getpid(), "port": self.proxy.port, "protocol": FRONT_PROTOCOL, "listen": self.settings.listen,
            "sites": [{"id": m.site.id, "config": m.config, "hosts": list(m.site.hosts), "live": m.site.live}
                      for m in self.proxy.members.values()]}
        if args.get("key"):
            m = self._site(args, uid)
            out["site"] = {"id": m.site.id, "hosts": list(m.site.hosts), "routing": self.routing(m),
                           "routes": list(m.routes), "max_routes": m.max_routes,
                           "drill": None if m.site.drill_slot is None else {"slot": bare(m.site.drill_slot.name)},
                           "health": {"ok": m.site.health_ok, "reason": m.site.health_reason}}
            out["live"] = m.site.live
        return out

    async def attach(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        project, config = str(args["project"]), str(args.get("config") or args["project"])
        if not os.path.isabs(project):
            raise ChangeoverError(f"the project's state directory must be an absolute path, got {project!r}")
        try:
            owner = os.stat(project).st_uid
        except OSError as e:
            raise ChangeoverError(f"cannot read the project's state directory {project}: {e.strerror}") from None
        if uid not in (owner, 0):
            raise ChangeoverError(f"refused: {project} belongs to uid {owner}, and the caller is uid {uid}")
        key = str(args.get("key") or "")
        if len(key) < 32:
            raise ChangeoverError("refused: the project's key must have at least 32 characters")
        hosts = tuple(str(h) for h in args.get("hosts") or ())
        if not hosts:
            raise ConfigError("at least one host name is needed on a shared front", file=config, key="proxy.hosts")
        async with self.lock:
            self._not_moved()
            sid = site_id(project)
            m = self.proxy.members.get(sid)
            adopted = m is not None
            if m is not None:
                if not hmac.compare_digest(m.key_hash, key_hash(key)):
                    raise ChangeoverError(f"refused: the project of {m.config} is attached with another key "
                                          f"(its {project}/front.key)")
                m.config, m.uid = config, uid
            else:
                m = self._member(sid, project, config, uid, key_hash(key), tuple(args.get("routes") or ()),
                                 int(args.get("max_routes") or 32))
            try:
                self._claim(m, hosts)
            except ConfigError:
                if not adopted:
                    del self.proxy.members[sid]
                raise
            if not adopted and isinstance(args.get("initial"), dict):
                self._load_routing(m, args["initial"])
            before, m.tls = m.tls, args.get("tls") if isinstance(args.get("tls"), dict) else None
            try:
                await self.https.apply()
            except ChangeoverError:
                m.tls = before
                if not adopted:
                    self._detach(m)
                raise
            self.save()
        log.info("site %s attached (%s) for %s: %s", sid, "adopted" if adopted else "new", config, ", ".join(hosts))
        return {"site": sid, "adopted": adopted, "pid": os.getpid(), "port": self.proxy.port,
                "settings": dataclasses.asdict(self.settings)}

    async def detach(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        async with self.lock:
            self._not_moved()
            m = self._site(args, uid)
            self._detach(m)
            await self.https.apply()
            self.save()
            left = len(self.proxy.members)
        log.info("site %s detached (%s); %d left", m.site.id, m.config, left)
        if not left:                       # nobody routes through this port any more
            asyncio.get_running_loop().call_later(0.05, self.stopped.set)
        return {"left": left}

    async def set_slot(self, args: dict[str, Any], uid: int) -> None:
        await self._change(args, uid, lambda m: self._set_slot(m, str(args["slot"]), list(args["upstreams"])))

    async def remove_slot(self, args: dict[str, Any], uid: int) -> None:
        await self._change(args, uid, lambda m: self._remove_slot(m, str(args["slot"])))

    async def set_version(self, args: dict[str, Any], uid: int) -> None:
        await self._change(args, uid, lambda m: m.site.recorder.set_version(str(args["slot"]),
                                                                            str(args.get("version") or "")))

    async def switch(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def go(m: Member) -> None:
            out["was"] = m.site.live
            self._switch(m, args.get("slot"))
            out["live"] = m.site.live
            log.info("site=%s switch state=%s was=%s", m.site.id, out["live"], out["was"])
        await self._change(args, uid, go)
        return out

    async def set_route(self, args: dict[str, Any], uid: int) -> None:
        def go(m: Member) -> None:
            if args.get("route") != "drill":
                raise ChangeoverError(f"unknown route {args.get('route')!r} (known: drill)")
            if args.get("fault"):
                raise ChangeoverError("drill faults are not applied on a shared front (a drill without a fault is)")
            slot, token = args.get("slot"), str(args.get("token") or "")
            if slot is None:
                m.site.drill_slot, m.site.drill_token = None, b""
                return
            pool = self.proxy.slots.get(m.site.pool_name(str(slot)))
            if pool is None:
                raise ChangeoverError(f"unknown slot {slot!r}")
            if len(token) < 16:
                raise ChangeoverError("the drill route needs a token of at least 16 characters")
            m.site.drill_slot, m.site.drill_token = pool, token.encode()
        await self._change(args, uid, go, save=False)

    async def pause(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def go(m: Member) -> None:
            out.update(m.site.traffic.pause(float(args["seconds"]), int(args["max_held"])))
        await self._change(args, uid, go)
        return out

    async def resume(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def go(m: Member) -> None:
            out["released"] = m.site.traffic.resume()
        await self._change(args, uid, go)
        return out

    async def maintenance(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        page = args.get("page")

        def go(m: Member) -> None:
            out.update(m.site.traffic.set_maintenance(bool(args["on"]), page.encode() if isinstance(page, str)
                                                      else None, int(args.get("retry_after", 30))))
        await self._change(args, uid, go)
        return out

    async def mode(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        return self._site(args, uid).site.traffic.mode()

    async def set_health(self, args: dict[str, Any], uid: int) -> None:
        m = self._site(args, uid)
        m.site.health_ok, m.site.health_reason = bool(args["ok"]), str(args.get("reason") or "")

    async def drain(self, args: dict[str, Any], uid: int) -> bool:
        m = self._site(args, uid)
        return await self.proxy.drain(m.site.pool_name(str(args["slot"])), float(args["timeout"]))

    async def metrics(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        since = args.get("since")
        return mirror.export(self._site(args, uid).site.recorder, int(since) if since is not None else None)

    async def _change(self, args: dict[str, Any], uid: int, fn: Callable[[Member], None], save: bool = True) -> None:
        async with self.lock:
            self._not_moved()
            fn(self._site(args, uid))
            if save:
                self.save()

    def _not_moved(self) -> None:
        if self.moved:
            raise ChangeoverError(MOVED)

    def _admin(self, args: dict[str, Any], uid: int) -> None:
        """The front's own user, root, or any attached project (an upgrade of the front is every
        project's business; it changes no route)."""
        if uid not in (os.getuid(), 0):
            self._site(args, uid)

    async def handover(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Start a successor on the same port, give it the control socket, retire this process."""
        self._admin(args, uid)
        async with self.lock:
            self._not_moved()
            self.save()
            nxt = self.socket_path.with_name(self.socket_path.name + ".next")
            pid = await start_front(nxt, self.registry, self.settings, public=self.socket_path)
            os.replace(nxt, self.socket_path)
            self.moved = True
        log.info("front handed over to pid %d; retiring", pid)

        async def go() -> None:
            for m in self.proxy.members.values():   # what a project's pause holds is released, never cut
                m.site.traffic.retiring(self.settings.drain_timeout)
            cut = await self.proxy.retire(self.settings.drain_timeout)
            log.info("retired: %d connection(s) cut", cut)
            self.stopped.set()
        self._retiring = asyncio.get_running_loop().create_task(go())
        return {"old_pid": os.getpid(), "pid": pid}

    async def shutdown(self, args: dict[str, Any], uid: int) -> None:
        self._admin(args, uid)
        asyncio.get_running_loop().call_later(0.05, self.stopped.set)

    # -- running -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.proxy.start()
        await self.https.apply()
        server = await serve(self.bind_path, self.handlers())
        inode = os.stat(self.bind_path).st_ino
        log.info("shared front listening on %s (pid %d), control socket %s", self.settings.listen, os.getpid(),
                 self.socket_path)
        print(json.dumps({"ready": True, "pid": os.getpid(), "port": self.proxy.port}), flush=True)
        self.ready = True
        bounded = asyncio.get_running_loop().create_task(bound_own_log())   # its log, next to the socket
        await self.stopped.wait()
        bounded.cancel()
        server.close()
        await self.proxy.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == inode:
                self.socket_path.unlink()
                if not self.proxy.members:
                    self.registry.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="changeover-front")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--bind", type=Path, help="bind the control socket here first (a handover's successor)")
    ap.add_argument("--registry", required=True, type=Path)
    ap.add_argument("--settings", required=True, help="ProxySettings as JSON")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started: list[Front] = []

    async def amain() -> None:
        front = Front(a.socket, a.registry, settings_from_json(a.settings), a.bind)
        started.append(front)
        front.load()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, front.stopped.set)
        await front.run()

    try:
        uvloop.run(amain())
    except Exception as e:
        if started and started[0].ready:
            log.exception("the shared front failed")
        else:
            log.exception("the shared front could not start")
            reason = "listen" if isinstance(e, ListenError) else "internal"
            print(json.dumps({"ready": False, "error": str(e), "reason": reason}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
