"""What the fleet looks like, as etcd says: the hosts' records and the desired state, kept current
by one watch of the fleet's prefix (hosts' step events forwarded as they arrive), and the reads
`status` and `history` make. The coordinator (coordinator.py) acts on this view.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from changeover.errors import DeployError
from changeover.fleet.config import FleetConfig
from changeover.fleet.etcd import Etcd, EtcdUnavailable
from changeover.fleet.model import Desired, Keys
from changeover.fleet.verdicts import explain

Progress = Callable[[dict[str, Any]], None]


class FleetError(DeployError):
    """A fleet operation failed or was refused; the message says what every host does now."""


class FleetView:
    def __init__(self, cfg: FleetConfig, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.keys = Keys(cfg)
        self.etcd = Etcd(cfg.etcd, ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file,
                         user=cfg.user, password=cfg.password)
        self.progress = progress
        self.records: dict[str, dict[str, Any]] = {}     # hosts/<name>, kept current by the watch
        self.desired: Desired | None = None
        self.desired_rev = 0
        self._changed = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self.lock_lost = False   # (set by a coordinator whose lock lease ran out)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        await self.etcd.close()

    def say(self, msg: str, ok: bool = True, **extra: Any) -> None:
        if self.progress is not None:
            self.progress({"type": "fleet", "ok": ok, "message": msg, **extra})

    # -- what the fleet looks like ------------------------------------------------------------------
    async def follow(self) -> None:
        """Read hosts and the desired state, then keep them current with one watch of the prefix;
        host step events are forwarded to the progress callback as they arrive."""
        kvs, rev = await self.etcd.get_prefix(self.keys.root)
        for kv in kvs:
            self._apply(kv.key, kv.json(), kv.mod_revision, replay=True)
        self._watch = asyncio.get_running_loop().create_task(self._watching(rev + 1))

    async def _watching(self, rev: int) -> None:
        while True:
            try:
                async for ev in self.etcd.watch(self.keys.root, prefix=True, start_revision=rev):
                    rev = ev.kv.mod_revision + 1
                    self._apply(ev.kv.key, ev.kv.json() if ev.type == "PUT" else None, ev.kv.mod_revision)
            except EtcdUnavailable:
                await asyncio.sleep(0.3)

    def _apply(self, key: str, value: Any, rev: int, replay: bool = False) -> None:
        if key.startswith(self.keys.hosts):
            name = self.keys.name_of(key)
            if value is None:
                self.records.pop(name, None)
            else:
                self.records[name] = value
        elif key == self.keys.desired:
            self.desired, self.desired_rev = Desired.from_wire(value), rev
        elif key.startswith(self.keys.events) and not replay and self.progress is not None and value:
            d = self.desired
            if d is not None and value.get("id") == d.id:
                self.progress({"type": "host", "host": value.get("host"), "event": value.get("event", {})})
        self._changed.set()

    async def changed(self, until: float) -> None:
        """Wait for news from etcd (at most until `until`, and 0.5 s: deadlines are checked too)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(until - time.monotonic(), 0.5))):
                await self._changed.wait()
        self._changed.clear()
        if self.lock_lost:
            raise FleetError("the fleet lock was lost (etcd unreachable for longer than lock_ttl): stopped; "
                             "every host keeps what it runs, the next deploy settles the rest")

    def result(self, host: str, dep_id: str, verb: str) -> dict[str, Any]:
        r = self.records.get(host, {}).get("results", {}).get(dep_id, {}).get(verb)
        return r if isinstance(r, dict) else {}

    def live_of(self, host: str) -> str | None:
        live = self.records.get(host, {}).get("live")
        return live.get("version") if isinstance(live, dict) else None

    def host_results(self, d: Desired) -> dict[str, Any]:
        return {h: {"live": self.live_of(h), **{verb: r.get("state") for verb, r in
                                                 self.records.get(h, {}).get("results", {}).get(d.id, {}).items()}}
                for h in d.hosts}

    # -- reading ------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        kvs, _ = await self.etcd.get_prefix(self.keys.root, serializable=True)
        lock = None
        for kv in kvs:
            if kv.key == self.keys.lock:
                lock = kv.json()
            elif not kv.key.startswith(self.keys.events) and not kv.key.startswith(self.keys.deploys):
                self._apply(kv.key, kv.json(), kv.mod_revision, replay=True)
        d = self.desired
        now = time.time()
        hosts: dict[str, Any] = {}
        for name in sorted(set(self.records) | set(d.hosts if d else [])):
            r = self.records.get(name)
            if r is None:
                hosts[name] = {"name": name, "reachable": False, "in_sync": False,
                               "why": f"no heartbeat for {self.cfg.host_ttl:g}s (cut off or stopped)"}
                continue
            hosts[name] = {**r, "reachable": True, "heartbeat_age": round(now - float(r.get("heartbeat", now)), 2)}
        rec = next((kv.json() for kv in kvs if d is not None and kv.key == self.keys.deploy(d.id)), None)
        return {"fleet": {"prefix": self.cfg.prefix, "etcd": list(self.cfg.etcd), "lock": lock,
                          "desired": d.wire() if d else None, "live": d.live if d else None,
                          "note": explain(d, lock, hosts, rec)},
                "hosts": hosts}

    async def history(self, limit: int) -> list[dict[str, Any]]:
        kvs, _ = await self.etcd.get_prefix(self.keys.deploys, serializable=True)
        rows = [kv.json() for kv in kvs]
        rows.sort(key=lambda r: str(r.get("id")), reverse=True)
        return rows[:limit]
