"""The proxy worker: the embedded proxy in a process of its own, controlled over a unix socket.

The daemon starts it in its own session, so the data plane outlives the control plane: a daemon
that is restarted, upgraded or killed with SIGKILL leaves traffic flowing, and adopts the running
worker again when it comes back (as it adopts the app's processes). Per-request metrics are kept
here, where requests are seen, and pulled by the daemon a few times a second.

    python -m changeover.proxy.worker --socket PATH --settings JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop

from changeover import rpc
from changeover.errors import ConfigError
from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from changeover.monitor.routes import RouteRules
from changeover.proxy import ops
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy, ListenError

log = logging.getLogger("changeover.proxy.worker")


class Worker:
    def __init__(self, socket_path: Path, settings: ProxySettings) -> None:
        self.socket_path = socket_path
        self.settings = settings
        self.recorder = Recorder(routes=RouteRules(settings.routes, settings.max_routes))
        # SO_REUSEPORT so that a successor can bind the same address during a handover (the
        # daemon checks the port is free before it starts a worker that has no predecessor).
        self.proxy = EmbeddedProxy(settings, self.recorder, reuse_port=True)
        self.stopped = asyncio.Event()
        self._retiring: asyncio.Task[None] | None = None
        self.ready = False               # the daemon was told; stdout is no longer read

    def preload(self, initial: dict[str, Any]) -> None:
        """Slots, versions and the live slot, set before the socket is bound: a successor in a
        handover must not take a single connection it cannot route."""
        for slot, upstreams in initial.get("slots", {}).items():
            self.proxy.set_slot(slot, [(h, int(p)) for h, p in upstreams])
        for slot, version in initial.get("versions", {}).items():
            self.recorder.set_version(slot, str(version))
        self.proxy.switch(initial.get("live"))
        health = initial.get("health")
        if isinstance(health, dict):
            self.proxy.set_health(bool(health.get("ok", True)), str(health.get("reason", "")))

    async def run(self) -> None:
        await self.proxy.start()
        server = await rpc.serve(self.socket_path, {
            ops.PING: self.ping, ops.RETIRE: self.retire, ops.SHUTDOWN: self.shutdown,
            ops.SET_SLOT: self.set_slot, ops.REMOVE_SLOT: self.remove_slot, ops.SET_VERSION: self.set_version,
            ops.SWITCH: self.switch, ops.DRAIN: self.drain, ops.METRICS: self.metrics,
            ops.SET_ROUTE: self.set_route, ops.SET_HEALTH: self.set_health,
        })
        inode = os.stat(self.socket_path).st_ino
        log.info("proxy listening on %s (pid %d)", self.settings.listen, os.getpid())
        print(json.dumps({"ready": True, "pid": os.getpid(), "port": self.proxy.port}), flush=True)
        self.ready = True
        await self.stopped.wait()
        server.close()
        await self.proxy.close()
        # After a handover the path belongs to the successor: only remove our own socket.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == inode:
                self.socket_path.unlink()

    async def ping(self, args: dict[str, Any], emit: rpc.Emit) -> ops.PingResult:
        return {"pid": os.getpid(), "port": self.proxy.port, "live": self.proxy.live, "protocol": ops.PROTOCOL,
                "settings": dataclasses.asdict(self.settings), "routing": self.routing(), "drill": self.proxy.drill,
                "health": {"ok": self.proxy.health_ok, "reason": self.proxy.health_reason}}

    def routing(self) -> ops.Routing:
        slots = self.proxy.slots
        return {"slots": {name: [[u.host, u.port] for u in s.upstreams] for name, s in slots.items()},
                "versions": {name: self.recorder.version(name) for name in slots},
                "live": self.proxy.live}

    async def set_slot(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        self.proxy.set_slot(args["slot"], [(h, int(p)) for h, p in args["upstreams"]])

    async def remove_slot(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        self.proxy.remove_slot(args["slot"])

    async def switch(self, args: dict[str, Any], emit: rpc.Emit) -> ops.SwitchResult:
        was = self.proxy.live
        self.proxy.switch(args["slot"])
        log.info("switch state=%s was=%s", args["slot"], was)
        return {"live": self.proxy.live, "was": was}

    async def set_route(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        fault = args.get("fault")
        self.proxy.set_route(str(args["route"]), args.get("slot"), args.get("token"),
                             dict(fault) if isinstance(fault, dict) else None)
        log.info("route=%s slot=%s fault=%s", args["route"], args.get("slot"), fault)

    async def set_health(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        self.proxy.set_health(bool(args["ok"]), str(args.get("reason") or ""))

    async def drain(self, args: dict[str, Any], emit: rpc.Emit) -> bool:
        return await self.proxy.drain(args["slot"], float(args["timeout"]))

    async def set_version(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        self.recorder.set_version(args["slot"], str(args.get("version") or ""))

    async def metrics(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        since = args.get("since")
        return mirror.export(self.recorder, int(since) if since is not None else None)

    async def retire(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        """Hand over to a successor that already listens: stop accepting, finish what is open
        (keep-alive clients are told `Connection: close`), then exit. Returns at once."""
        timeout = float(args["timeout"])

        async def go() -> None:
            cut = await self.proxy.retire(timeout)
            log.info("retired: %d connection(s) cut at the %.1fs timeout", cut, timeout)
            self.stopped.set()

        if self._retiring is None:
            self._retiring = asyncio.get_running_loop().create_task(go())

    async def shutdown(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        asyncio.get_running_loop().call_later(0.05, self.stopped.set)


def _not_ready(error: str, reason: str, key: str | None = None) -> None:
    """Tell the starting daemon why there is no worker: `reason` is "listen" (the [proxy] listen
    address cannot be bound), "config" (a setting the proxy refuses) or "internal" (anything
    else: the traceback is in the log)."""
    print(json.dumps({"ready": False, "error": error, "reason": reason, "key": key}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="changeover-proxy")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--settings", required=True, help="ProxySettings as JSON")
    ap.add_argument("--initial", help='routing to load before listening: {"slots": {...}, "versions": {...}, '
                    '"live": ...}')
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started: list[Worker] = []

    async def amain() -> None:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in json.loads(a.settings).items()}   # JSON has no tuples
        settings = ProxySettings(**fields)
        worker = Worker(a.socket, settings)
        started.append(worker)
        if a.initial:
            worker.preload(json.loads(a.initial))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopped.set)
        await worker.run()

    try:
        uvloop.run(amain())
    except Exception as e:
        if started and started[0].ready:    # the daemon was told we run; it no longer reads stdout
            log.exception("the proxy worker failed")
        elif isinstance(e, ListenError):
            _not_ready(str(e), "listen", "proxy.listen")
        elif isinstance(e, ConfigError):     # the daemon adds the key again: send the bare message
            _not_ready(str(e).removeprefix(f"{e.key}: ") if e.key else str(e), "config", e.key)
        else:
            # e.g. the control socket cannot be created: nothing the [proxy] listen address can fix
            log.exception("the proxy worker could not start")
            _not_ready(f"{type(e).__name__}: {e}", "internal")
        sys.exit(1)


if __name__ == "__main__":
    main()
