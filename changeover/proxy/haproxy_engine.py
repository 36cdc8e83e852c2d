"""`ProxyControl` on HAProxy: `[proxy] engine = "haproxy"`.

changeover writes the config under `<state dir>/haproxy/` and runs HAProxy in master-worker mode
(`-W`, master CLI `-S`, stats socket `level admin` with `expose-fd listeners`) in a session of
its own, so it outlives the daemon like the embedded worker does; or, with `[proxy]
haproxy_socket`, it drives an HAProxy someone else runs (then it never starts, reloads or stops
it). Routing is read back from HAProxy on every call (`show servers state`), never cached, so a
new daemon (or a new engine object) adopts a running HAProxy and `live()` is what HAProxy does.

Metrics: HAProxy logs one line per request into a ring the engine follows on the stats socket
(`haproxy_log.LogFollower`), into a `Recorder` kept here, in the daemon process. That is fine
because nothing is lost that the daemon could use: the Recorder restarts with the daemon, and so
do the daemon's mirror of it and its `/metrics` (a counter reset, which Prometheus handles);
requests served while no daemon runs are not counted, which only means a resumed observation
window starts from fresh buckets. A restarted daemon reads the ring from "now" on (`-n`), so no
line is counted twice. HAProxy's own counters (`show stat`) survive a daemon restart, so they
are never added in; they only cross-check the log (`lost()`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from changeover.errors import ChangeoverError
from changeover.monitor import mirror
from changeover.proxy import haproxy as hx
from changeover.proxy import haproxy_cli as hcli
from changeover.proxy.control import PROXY_PROTOCOL
from changeover.proxy.haproxy_process import POLL, HAProxyProcess

log = logging.getLogger("changeover.proxy.haproxy")
TUNNEL_POLL = 0.5           # how often a drain asks HAProxy whether only tunnels are left


class HAProxyControl(HAProxyProcess):
    """Routing, draining, modes and metrics through HAProxy's runtime API; starting, adopting,
    reloading and stopping the process is haproxy_process.py's."""

    # -- ProxyControl: routing ------------------------------------------------------------------
    async def ping(self) -> dict[str, Any] | None:
        if not await self._answers():
            return None
        servers = await self._servers()
        return {"pid": self.pid, "port": self.port, "live": _live(servers),
                "settings": self._running_settings(), "protocol": PROXY_PROTOCOL}

    async def live(self) -> str | None:
        try:
            servers = await self._servers()
        except ChangeoverError as e:
            log.warning("asking HAProxy which slot is live failed: %s", e)
            return None
        return _live(servers)

    @property
    def settings_differ(self) -> bool:
        """The config HAProxy runs (as written) differs from what the settings now produce."""
        text = self._written()
        if text is None:
            return False            # attached, or nothing written: nothing of ours to compare
        port = self.settings.port or hx.written_port(text) or 0
        return hx.split_config(text)[0] != hx.settings_part(self.settings, self.paths, port)

    def _running_settings(self) -> dict[str, Any]:
        text = self._written()
        return (hx.written_settings(text) if text else None) or dataclasses.asdict(self.settings)

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        hx.check_slot_name(slot)
        wanted = list(dict.fromkeys(hx.check_upstream(slot, u) for u in upstreams))
        servers = await self._servers()
        live = _live(servers)
        mine = [s for s in servers if s.slot == slot]
        current = {s.addr: s for s in mine if not s.parked}
        parked = [s for s in mine if s.parked]
        state = "ready" if slot == live else "maint"
        add: list[str] = []
        taken = {s.name for s in mine}
        for host, port in wanted:
            if (host, port) in current:
                continue
            if parked:
                name = parked.pop(0).name
            else:                   # beyond the pool: a dynamic server (starts in maintenance)
                name = _next_name(slot, taken)
                taken.add(name)
                add.append(f"add server {hx.BACKEND}/{name} {_hostport(host, port)}")
            add += [f"set server {hx.BACKEND}/{name} addr {host} port {port}",
                    f"set server {hx.BACKEND}/{name} state {state}"]
        retire = [c for s in current.values() if s.addr not in wanted for c in _park(s.name)]
        if add or retire:           # new upstreams up before old ones go: a live slot never empties
            await self._run(hcli.commands(add, retire))

    async def remove_slot(self, slot: str) -> None:
        servers = await self._servers()
        if _live(servers) == slot:
            raise ChangeoverError(f"slot {slot} is live; switch away from it before removing it")
        # maintenance closes the servers' idle connections, so the app's graceful stop can finish
        cmds = [c for s in servers if s.slot == slot and not s.parked for c in _park(s.name)]
        if cmds:
            await self._run(hcli.commands(cmds))

    async def switch(self, slot: str | None) -> dict[str, Any]:
        servers = await self._servers()
        was = _live(servers)
        assigned = [s for s in servers if not s.parked]
        new = [s for s in assigned if s.slot == slot]
        if slot is not None and not new:
            known = sorted({s.slot for s in assigned})
            raise ChangeoverError(f"unknown slot {slot!r} (slots with upstreams: {', '.join(known) or 'none'})")
        # one command line, run by HAProxy in order: the new slot up first, then the rest to drain
        # (drain keeps what is in flight and takes nothing new), so no request meets an empty backend
        up = [f"set server {hx.BACKEND}/{s.name} state ready" for s in new if s.state != "ready"]
        down = [f"set server {hx.BACKEND}/{s.name} state drain" for s in assigned
                if s.slot != slot and s.state == "ready"]
        if up or down:
            await self._run(hcli.commands(up, down))
        now = _live(await self._servers())
        if now != slot:
            raise ChangeoverError(f"HAProxy did not switch to {slot!r}: it routes to {now!r}")
        log.info("switch state=%s was=%s", slot, was)
        return {"live": slot, "was": was}

    async def inflight(self, slot: str) -> int:
        """Streams (requests and tunnels) and server connections in use of the slot."""
        return sum((await self._busy(slot)).values())

    async def _busy(self, slot: str) -> dict[str, int]:
        names = {s.name for s in await self._servers() if s.slot == slot and not s.parked}
        if not names:
            return {}
        stat = hcli.parse_stat(await self._cli("show stat"))
        conns = hcli.parse_conns(await self._cli(f"show servers conn {hx.BACKEND}"))
        return {n: max(stat.get(n, {}).get("scur", 0), conns.get(n, 0)) for n in names}

    async def drain_requests(self, slot: str, timeout: float) -> dict[str, Any]:
        """`drain()` that does not wait for tunnels: once every stream left on the slot's servers is
        a tunnel (`show sess all`: answered 101), it returns. HAProxy cannot send a WebSocket close
        frame: those tunnels end when the retired release's processes stop, at the drain limit
        (daemon/linger.py), without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        looked = -TUNNEL_POLL
        while busy := {n: c for n, c in (await self._busy(slot)).items() if c}:
            now = loop.time()
            if now - looked >= TUNNEL_POLL:   # `show sess all` is long with many streams: not every poll
                looked = now
                tunnels = hcli.parse_tunnels(await self._cli("show sess all"))
                if all(tunnels.get(n, 0) >= c for n, c in busy.items()):
                    n = sum(busy.values())
                    log.info("drain of slot %s: %d tunnel(s) left, not waiting for them", slot, n)
                    return {"clean": True, "tunnels": n, "websockets": -1, "limit_in": max(0.0, deadline - now),
                            "close_frame": False}
            if now >= deadline:
                break
            await asyncio.sleep(min(POLL, max(0.0, deadline - now)))
        return {"clean": await self.drain(slot, max(0.0, deadline - loop.time())), "tunnels": 0, "websockets": 0,
                "limit_in": 0.0}

    async def drain(self, slot: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        clean = True
        while await self.inflight(slot):
            if loop.time() >= deadline:
                names = [s.name for s in await self._servers() if s.slot == slot and not s.parked]
                await self._run(hcli.commands([f"shutdown sessions server {hx.BACKEND}/{n}" for n in names]))
                log.warning("drain of slot %s timed out after %.1fs; closed what was left", slot, timeout)
                clean = False
                break
            await asyncio.sleep(min(POLL, max(0.0, deadline - loop.time())))
        servers = await self._servers()
        if _live(servers) != slot:      # drained and not live: maintenance closes idle connections
            cmds = [f"set server {hx.BACKEND}/{s.name} state maint" for s in servers
                    if s.slot == slot and not s.parked and s.state != "maint"]
            if cmds:
                await self._run(hcli.commands(cmds))
        return clean

    # -- pause and maintenance (daemon/traffic.py) -----------------------------------------------------
    can_pause = False                      # HAProxy queues per server up to `timeout queue`, never in order

    async def pause(self, timeout: float, max_held: int) -> dict[str, Any]:
        raise ChangeoverError('[proxy] engine = "haproxy" cannot hold requests in order (`changeover pause` needs '
                              'the embedded proxy, engine = "embedded"); `changeover maintenance` works on both')

    async def resume(self) -> int:
        return 0                           # nothing is ever held here

    async def maintenance(self, on: bool, page: bytes | None = None, retry_after: int = 30) -> dict[str, Any]:
        """The frontend's maintenance rule (haproxy.settings_part) switched by proc variables: no
        reload. A reload or a fresh start loads them from the config (haproxy.mode_part, written
        with the daemon's mode); traffic.restore sets them again after either."""
        if self.attached:
            raise ChangeoverError(f"HAProxy is attached through [proxy] haproxy_socket ({self.admin}): its config "
                                  "has no maintenance rule of changeover's; switch maintenance in that HAProxy")
        if not on:
            await self._run(f"experimental-mode on; set var proc.{hx.MAINT} int(0)")
            return await self.mode() or {}
        from changeover.proxy.hold import DEFAULT_PAGE

        pairs = hx.maintenance_vars(page or DEFAULT_PAGE, retry_after)
        sets = "; ".join(f"set var proc.{name} {expr}" for name, expr in pairs)
        await self._run(f"experimental-mode on; {sets}")
        return await self.mode() or {}

    async def mode(self) -> dict[str, Any] | None:
        try:
            out = await self._cli(f"experimental-mode on; get var proc.{hx.MAINT}")
        except OSError as e:
            raise ChangeoverError(f"HAProxy admin socket {self.admin}: {e.strerror or e}") from None
        on = "value=<1>" in out
        return {"paused": False, "held": 0, "maintenance": on}

    async def set_version(self, slot: str, version: str | None) -> None:
        self.recorder.set_version(slot, version)

    # -- ProxyControl: metrics -----------------------------------------------------------------
    async def metrics(self, since: Any = None) -> dict[str, Any]:
        self.follower.keep()
        return mirror.export(self.recorder, int(since) if since is not None else None)

    async def lost(self) -> dict[str, int]:
        """Cross-check of the log against HAProxy's own counters since counting began (first
        call, or after a reload reset them): requests HAProxy served, lines received, and the
        lines HAProxy could not send (DroppedLogs)."""
        stat = hcli.parse_stat(await self._cli("show stat"))
        info = hcli.parse_info(await self._cli("show info"))
        served = sum(s["stot"] for s in stat.values())
        if self._baseline is None or served < self._baseline[0]:
            self._baseline = (served, self.follower.lines)
        return {"served": served - self._baseline[0], "logged": self.follower.lines - self._baseline[1],
                "dropped_logs": int(info.get("DroppedLogs", "0") or 0)}

    # -- helpers --------------------------------------------------------------------------------
    async def _run(self, command: str) -> None:
        """A command line whose failure is a bug or a dead HAProxy: raise with HAProxy's words."""
        try:
            out = await self._cli(command)
        except OSError as e:
            raise ChangeoverError(f"HAProxy admin socket {self.admin}: {e.strerror or e}") from None
        bad = hcli.cli_errors(out)
        if bad:
            raise ChangeoverError(f"HAProxy refused {command!r}: {'; '.join(bad)}")

    async def _servers(self) -> list[hcli.Server]:
        try:
            out = await self._cli(f"show servers state {hx.BACKEND}")
        except OSError as e:
            raise ChangeoverError(f"HAProxy admin socket {self.admin}: {e.strerror or e}") from None
        servers = hcli.parse_servers_state(out)
        if not servers:
            raise ChangeoverError(f"HAProxy on {self.admin} has no backend {hx.BACKEND!r} with servers "
                                  f"(see docs/operations.md, HAProxy engine): {out.strip()[:200]}")
        return servers




def _live(servers: Sequence[hcli.Server]) -> str | None:
    """The slot whose servers take new requests. Only one can: switch() readies one and drains
    the others in a single command line."""
    ready = sorted({s.slot for s in servers if s.state == "ready" and not s.parked})
    if len(ready) > 1:
        log.warning("HAProxy routes new requests to several slots: %s", ", ".join(ready))
    return ready[0] if ready else None


def _park(name: str) -> list[str]:
    return [f"set server {hx.BACKEND}/{name} state maint",
            f"set server {hx.BACKEND}/{name} addr {hx.PARKED_HOST} port {hx.PARKED_PORT}"]


def _next_name(slot: str, taken: set[str]) -> str:
    i = 1
    while f"{slot}-{i}" in taken:
        i += 1
    return f"{slot}-{i}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
