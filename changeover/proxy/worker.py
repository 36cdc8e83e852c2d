"""The proxy worker: the embedded proxy in a process of its own, controlled over a unix socket.

The daemon starts it in its own session, so the data plane outlives the control plane: a daemon
that is restarted, upgraded or killed with SIGKILL leaves traffic flowing, and adopts the running
worker again when it comes back (as it adopts the app's processes). Per-request metrics are kept
here, where requests are seen, and pulled by the daemon a few times a second.

    python -m changeover.proxy.worker --socket PATH --settings JSON

With `[proxy] workers` > 1 this process is the leader of a group of workers (proxy/workers.py):
it starts the followers, and every op it is sent applies to all of them before it answers.
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
from changeover.daemon.logs import bound_own_log
from changeover.errors import ChangeoverError, ConfigError
from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from changeover.monitor.routes import RouteRules
from changeover.proxy import ops
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy, ListenError
from changeover.proxy.tls_settings import TlsSettings
from changeover.proxy.workers import Group, merge, unsteer_when_alone

log = logging.getLogger("changeover.proxy.worker")


class Worker:
    def __init__(self, socket_path: Path, settings: ProxySettings, follower: bool = False) -> None:
        self.socket_path = socket_path
        self.settings = settings
        self.follower = follower         # started by a leader (proxy/workers.py), not by the daemon
        self.group: Group | None = None  # the leader's followers, with [proxy] workers > 1
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
        mode = initial.get("mode")
        if isinstance(mode, dict):
            self.proxy.traffic.apply(mode)

    async def run(self) -> None:
        await self.proxy.start()
        if not self.follower and self.settings.workers > 1:
            self.group = Group(self.socket_path, self.settings)
            await self.group.start(lambda: {**self.routing(), "health": {"ok": self.proxy.health_ok,
                                                                          "reason": self.proxy.health_reason},
                                            "mode": self.proxy.traffic.wire()})
        if self.follower:
            await self._watch_leader()
        server = await rpc.serve(self.socket_path, self._fan_out({
            ops.PING: self.ping, ops.RETIRE: self.retire, ops.SHUTDOWN: self.shutdown,
            ops.SET_SLOT: self.set_slot, ops.REMOVE_SLOT: self.remove_slot, ops.SET_VERSION: self.set_version,
            ops.SWITCH: self.switch, ops.DRAIN: self.drain, ops.METRICS: self.metrics,
            ops.DRAIN_REQUESTS: self.drain_requests,
            ops.SET_ROUTE: self.set_route, ops.SET_HEALTH: self.set_health,
            ops.PAUSE: self.pause, ops.RESUME: self.resume, ops.MAINTENANCE: self.maintenance, ops.MODE: self.mode,
        }))
        inode = os.stat(self.socket_path).st_ino
        log.info("proxy listening on %s (pid %d)", self.settings.listen, os.getpid())
        pids = [os.getpid(), *(self.group.pids if self.group else ())]
        print(json.dumps({"ready": True, "pid": os.getpid(), "port": self.proxy.port, "pids": pids}), flush=True)
        self.ready = True
        # a predecessor group's steering program goes once its listeners are gone (proxy/workers.py)
        unsteer = None if self.follower else asyncio.get_running_loop().create_task(
            unsteer_when_alone(self.proxy, self.settings.workers))
        # proxy.log (this process's stderr, the followers' too) stays bounded on a long-lived host
        bounded = None if self.follower else asyncio.get_running_loop().create_task(bound_own_log())
        await self.stopped.wait()
        for task in (unsteer, bounded):
            if task is not None:
                task.cancel()
        server.close()
        if self.group is not None and not self.group.stopping:
            await self.group.stop()
        await self.proxy.close()
        # After a handover the path belongs to the successor: only remove our own socket.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == inode:
                self.socket_path.unlink()

    async def ping(self, args: dict[str, Any], emit: rpc.Emit) -> ops.PingResult:
        return {"pid": os.getpid(), "port": self.proxy.port, "live": self.proxy.live, "protocol": ops.PROTOCOL,
                "settings": dataclasses.asdict(self.settings), "routing": self.routing(), "drill": self.proxy.drill,
                "health": {"ok": self.proxy.health_ok, "reason": self.proxy.health_reason},
                "mode": self.proxy.traffic.mode(),
                "tls": self.proxy.tls.status() if self.proxy.tls is not None else None}

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

    async def pause(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return self.proxy.traffic.pause(float(args["seconds"]), int(args["max_held"]))

    async def resume(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return {"released": self.proxy.traffic.resume()}

    async def mode(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return self.proxy.traffic.mode()

    async def maintenance(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        page = args.get("page")
        return self.proxy.traffic.set_maintenance(bool(args["on"]), page.encode() if isinstance(page, str) else None,
                                                  int(args.get("retry_after", 30)))

    async def drain(self, args: dict[str, Any], emit: rpc.Emit) -> bool:
        return await self.proxy.drain(args["slot"], float(args["timeout"]))

    async def drain_requests(self, args: dict[str, Any], emit: rpc.Emit) -> ops.DrainResult:
        return await self.proxy.drain_requests(args["slot"], float(args["timeout"]))

    async def set_version(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        self.recorder.set_version(args["slot"], str(args.get("version") or ""))

    async def metrics(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        since = args.get("since")
        return mirror.export(self.recorder, int(since) if since is not None else None)

    async def retire(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        """Hand over to a successor that already listens: stop accepting, finish what is open
        (keep-alive clients are told `Connection: close`), then exit. Returns at once."""
        timeout = float(args["timeout"])
        self.proxy.traffic.retiring(timeout)   # what a pause holds here is released, never cut
        # the successors' sockets follow this group's in the port's SO_REUSEPORT group
        first = int(args.get("first") or self.settings.workers)
        count = int(args.get("count", 1))

        async def go() -> None:
            if self.group is not None:
                _, cut = await asyncio.gather(self.group.retire(timeout, first, count),
                                              self.proxy.retire(timeout, first, count))
            else:
                cut = await self.proxy.retire(timeout, first, count)
            log.info("retired: %d connection(s) cut at the %.1fs timeout", cut, timeout)
            self.stopped.set()

        if self._retiring is None:
            self._retiring = asyncio.get_running_loop().create_task(go())

    async def shutdown(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        asyncio.get_running_loop().call_later(0.05, self.stopped.set)


    # -- a group of workers (proxy/workers.py) ---------------------------------------------------
    def _fan_out(self, handlers: dict[str, rpc.Handler]) -> dict[str, rpc.Handler]:
        """The leader's handlers: each op applies here and on every follower before it answers."""
        group = self.group
        if group is None:
            return handlers
        local = dict(handlers)
        parallel = {ops.DRAIN, getattr(ops, "DRAIN_REQUESTS", ops.DRAIN)}   # waits: every worker at once

        def wrap(op: str, handler: rpc.Handler) -> rpc.Handler:
            async def both(args: dict[str, Any], emit: rpc.Emit) -> Any:
                if op in parallel:
                    mine, theirs = await asyncio.gather(handler(args, emit),
                                                        group.each(op, args, float(args.get("timeout", 0)) + 10))
                    return _combine([mine, *theirs])
                mine = await handler(args, emit)        # refused here: refused, no follower touched
                return _combine([mine, *await group.each(op, args)])
            return both

        out = {op: wrap(op, h) for op, h in local.items()
               if op not in (ops.PING, ops.SWITCH, ops.METRICS, ops.RETIRE, ops.SHUTDOWN)}
        out.update({ops.PING: self._group_ping, ops.SWITCH: self._group_switch, ops.METRICS: self._group_metrics,
                    ops.RETIRE: local[ops.RETIRE], ops.SHUTDOWN: self._group_shutdown})
        return out

    async def _group_ping(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        assert self.group is not None
        info: dict[str, Any] = dict(await self.ping(args, emit))
        workers = [{"pid": os.getpid(), "live": self.proxy.live}, *await self.group.repair(self.proxy.live)]
        info["workers"] = workers
        info["pids"] = [w["pid"] for w in workers]
        return info

    async def _group_switch(self, args: dict[str, Any], emit: rpc.Emit) -> ops.SwitchResult:
        """Acknowledged only once every worker routes to the new slot; a follower that does not
        acknowledge fails the switch, and every worker goes back to the slot it had."""
        assert self.group is not None
        was = self.proxy.live
        result = await self.switch(args, emit)
        failed = await self.group.switch(args["slot"], was)
        if failed:
            self.proxy.switch(was)
            log.error("switch to %s failed on %s: every worker is back on %s", args["slot"], "; ".join(failed), was)
            raise ChangeoverError(f"the switch to {args['slot']} was not acknowledged by proxy {'; '.join(failed)}; "
                                  f"every proxy worker routes to {was} again")
        return result

    async def _group_metrics(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        assert self.group is not None
        mine = await self.metrics(args, emit)
        return merge([mine, *await self.group.metrics(args.get("since"))])

    async def _group_shutdown(self, args: dict[str, Any], emit: rpc.Emit) -> None:
        assert self.group is not None
        await self.group.stop()
        await self.shutdown(args, emit)

    async def _watch_leader(self) -> None:
        """A follower retires when its leader is gone (its end of our stdin closes): the daemon's
        next leader must find the port free, and nobody could route this worker any more."""
        loop = asyncio.get_running_loop()
        worker = self
        gone: list[asyncio.Task[None]] = []

        class Pipe(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                if worker._retiring is None and not worker.stopped.is_set():
                    log.warning("the leader proxy worker is gone: retiring")
                    gone.append(loop.create_task(
                        worker.retire({"timeout": worker.settings.drain_timeout, "count": 0}, _no_emit)))

        await loop.connect_read_pipe(Pipe, sys.stdin)


async def _no_emit(event: dict[str, Any]) -> None:
    """Events of an op called from inside the worker go nowhere."""


def _combine(results: list[Any]) -> Any:
    """One answer from every worker's: flags hold if they hold everywhere, counts add up, times
    are the longest; anything else is the leader's."""
    first = results[0]
    if isinstance(first, bool):
        return all(bool(r) for r in results)
    if isinstance(first, int):
        return sum(int(r or 0) for r in results)
    if isinstance(first, float):
        return max(float(r or 0) for r in results)
    if isinstance(first, dict):
        return {k: _combine([v, *(r.get(k) if isinstance(r, dict) else None for r in results[1:])])
                for k, v in first.items()}
    return first


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
    ap.add_argument("--follower", action="store_true", help="started by a leader worker (proxy/workers.py)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started: list[Worker] = []

    async def amain() -> None:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in json.loads(a.settings).items()}   # JSON has no tuples
        if isinstance(fields.get("tls"), dict):          # [proxy.tls], nested in the JSON
            fields["tls"] = TlsSettings.from_wire(fields["tls"])
        settings = ProxySettings(**fields)
        worker = Worker(a.socket, settings, follower=a.follower)
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
            _not_ready(str(e), "listen", e.key)
        elif isinstance(e, ConfigError):     # the daemon adds the key again: send the bare message
            _not_ready(str(e).removeprefix(f"{e.key}: ") if e.key else str(e), "config", e.key)
        else:
            # e.g. the control socket cannot be created: nothing the [proxy] listen address can fix
            log.exception("the proxy worker could not start")
            _not_ready(f"{type(e).__name__}: {e}", "internal")
        sys.exit(1)


if __name__ == "__main__":
    main()
