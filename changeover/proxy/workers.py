"""Several proxy worker processes on one port (`[proxy] workers = N`): the leader and its followers.

The daemon still talks to one process, the *leader* (`proxy.worker`, on `.changeover/proxy.sock`),
so adopting the data plane after a daemon restart adopts every worker at once. The leader carries
traffic itself and starts N-1 *followers*: the same worker program, each with a private control
socket and the leader's routing preloaded, each bound to the port with SO_REUSEPORT, so the kernel
spreads new connections over all of them. The leader says it is ready only once every follower
listens, which keeps a handover gap-free: the whole new group listens before the old one retires.

Every routing op is applied by the leader and then by each follower; the leader answers only when
all have it. A switch that a follower does not acknowledge fails, and every worker is switched
back to the slot it had (`switch`). The leader's own state is the reference: a follower that
disagrees with it (a failed switch-back, a follower restarted) is put back in line on the next
ping (`repair`), which is what the daemon's recovery reads. A daemon killed in the middle of a
switch cannot split the group: the fan-out runs in the leader, which the daemon's death does not
interrupt.

Followers watch a pipe from the leader: when the leader is gone (killed), they retire (stop
accepting, finish what is open) and exit, so the port is free for the group the daemon starts next.
Metrics are pulled from every worker and added up (`merge`): the daemon sees one set of
per-request figures, as with one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from changeover import rpc, sockets
from changeover.errors import ChangeoverError, DaemonError
from changeover.proxy import ops
from changeover.proxy.base import ProxySettings

if TYPE_CHECKING:
    from changeover.proxy.embedded import EmbeddedProxy

log = logging.getLogger("changeover.proxy.workers")
START_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0
SWITCH_TIMEOUT = 5.0    # a follower's switch: the leader answers (and switches back) before the daemon gives up
REPAIR_TIMEOUT = 0.5    # per call of a ping's check of the followers (the daemon's ping waits 2 s)


@dataclasses.dataclass
class Follower:
    index: int
    socket: Path
    proc: asyncio.subprocess.Process
    pid: int


class Group:
    """The leader's followers: started, driven and stopped together."""

    def __init__(self, leader_socket: Path, settings: ProxySettings) -> None:
        self.settings = settings
        self.count = max(1, settings.workers) - 1
        # private sockets, unique per leader (a handover's two groups coexist for a while)
        self.dir = leader_socket.parent
        self.base = f"proxy.{os.getpid()}"
        self.followers: list[Follower] = []
        self.stopping = False
        self.routing: Callable[[], dict[str, Any]] = dict
        self._watchers: set[asyncio.Task[None]] = set()

    async def start(self, routing: Callable[[], dict[str, Any]]) -> None:
        """Start every follower preloaded with `routing()` (the leader's routing now); returns once
        all of them listen. A follower that exits on its own later is started again, the same way."""
        self.routing = routing
        try:
            now = routing()
            self.followers = list(await asyncio.gather(*(self._spawn(i, now) for i in range(1, self.count + 1))))
        except BaseException:
            await self.stop()
            raise
        for f in self.followers:
            self._watch(f)

    def _watch(self, f: Follower) -> None:
        task = asyncio.get_running_loop().create_task(self._restart_on_exit(f))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _restart_on_exit(self, f: Follower) -> None:
        code = await f.proc.wait()
        while not self.stopping:
            log.error("proxy worker %d (pid %d) exited (status %s): starting it again", f.index, f.pid, code)
            try:
                new = await self._spawn(f.index, self.routing())
            except Exception:
                log.exception("proxy worker %d could not be started again", f.index)
                await asyncio.sleep(1.0)
                continue
            if self.stopping:              # stopped meanwhile: this one goes too
                self.followers.append(new)
                return
            self.followers = [new if x is f else x for x in self.followers]
            self._watch(new)
            return

    async def _spawn(self, index: int, routing: dict[str, Any]) -> Follower:
        sock = sockets.place(self.dir, f"{self.base}.{index}.sock")
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "changeover.proxy.worker", "--socket", str(sock), "--follower",
            "--settings", json.dumps(dataclasses.asdict(self.settings)), "--initial", json.dumps(routing),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)   # stderr: the leader's log
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):   # not wait_for: it can drop a cancel (3.11)
                line = await proc.stdout.readline()
        except TimeoutError:
            proc.kill()
            raise DaemonError(f"proxy worker {index} did not start within {START_TIMEOUT}s") from None
        msg = json.loads(line or b"{}")
        if not msg.get("ready"):
            await proc.wait()
            raise ChangeoverError(f"proxy worker {index} could not start: {msg.get('error') or proc.returncode}")
        log.info("proxy worker %d started (pid %d)", index, proc.pid)
        return Follower(index, sock, proc, proc.pid)

    @property
    def pids(self) -> list[int]:
        return [f.pid for f in self.followers]

    async def each(self, op: str, args: dict[str, Any], timeout: float | None = CALL_TIMEOUT) -> list[Any]:
        """`op` on every follower at once; raises naming the first that failed (after all answered)."""
        results = await asyncio.gather(*(rpc.call(f.socket, op, args, timeout=timeout) for f in self.followers),
                                       return_exceptions=True)
        for f, r in zip(self.followers, results, strict=True):
            if isinstance(r, BaseException):
                raise ChangeoverError(f"proxy worker {f.index} (pid {f.pid}) failed {op}: {r}")
        return list(results)

    async def switch(self, slot: str | None, was: str | None) -> list[str]:
        """Switch every follower to `slot`. Those that did not acknowledge are named in the result,
        and then every follower is sent back to `was` (the caller switches the leader back)."""
        results = await asyncio.gather(*(rpc.call(f.socket, ops.SWITCH, {"slot": slot}, timeout=SWITCH_TIMEOUT)
                                         for f in self.followers), return_exceptions=True)
        failed = [f"worker {f.index} (pid {f.pid}): {r}" for f, r in zip(self.followers, results, strict=True)
                  if isinstance(r, BaseException)]
        if failed:
            back = await asyncio.gather(*(rpc.call(f.socket, ops.SWITCH, {"slot": was}, timeout=CALL_TIMEOUT)
                                          for f in self.followers), return_exceptions=True)
            for f, r in zip(self.followers, back, strict=True):
                if isinstance(r, BaseException):
                    log.error("proxy worker %d could not be switched back to %s: %s (repaired on the next ping)",
                              f.index, was, r)
        return failed

    async def repair(self, live: str | None) -> list[dict[str, Any]]:
        """Every follower's pid and live slot; one that disagrees with the leader's `live` is
        switched to it (the leader's state is the group's: a deterministic resolution). Bounded
        well inside the daemon's ping timeout, so a hung follower never makes the leader look dead."""
        return list(await asyncio.gather(*(self._repair_one(f, live) for f in self.followers)))

    async def _repair_one(self, f: Follower, live: str | None) -> dict[str, Any]:
        try:
            info = await rpc.call(f.socket, ops.PING, timeout=REPAIR_TIMEOUT)
        except (DaemonError, OSError) as e:
            return {"pid": f.pid, "live": None, "error": str(e)}
        theirs = info.get("live")
        if theirs != live:
            log.warning("proxy worker %d (pid %d) routes to %s, the leader to %s: switching it to %s",
                        f.index, f.pid, theirs, live, live)
            try:
                await rpc.call(f.socket, ops.SWITCH, {"slot": live}, timeout=REPAIR_TIMEOUT)
                theirs = live
            except (DaemonError, OSError) as e:
                log.error("proxy worker %d could not be switched: %s", f.index, e)
        return {"pid": f.pid, "live": theirs}

    async def metrics(self, since: Any) -> list[dict[str, Any]]:
        """Every reachable follower's export: one being started again has nothing to add yet,
        and the daemon's figures must not stop for it."""
        results = await asyncio.gather(*(rpc.call(f.socket, ops.METRICS, {"since": since}, timeout=2)
                                         for f in self.followers), return_exceptions=True)
        return [dict(r) for r in results if isinstance(r, dict)]

    async def retire(self, timeout: float, first: int, count: int) -> None:
        """Tell every follower to retire (they steer new connections to the successors' sockets
        `first`..`first+count-1` of the port's group) and wait until they have exited."""
        self.stopping = True
        await asyncio.gather(*(rpc.call(f.socket, ops.RETIRE, {"timeout": timeout, "first": first, "count": count},
                                        timeout=5) for f in self.followers), return_exceptions=True)
        await self._wait_exit(timeout + 5)

    async def stop(self) -> None:
        """Shut every follower down now (changeover down, or the leader stopping)."""
        self.stopping = True
        await asyncio.gather(*(rpc.call(f.socket, ops.SHUTDOWN, timeout=2) for f in self.followers),
                             return_exceptions=True)
        await self._wait_exit(5)

    async def _wait_exit(self, timeout: float) -> None:
        for f in self.followers:
            try:
                async with asyncio.timeout(timeout):
                    await f.proc.wait()
            except TimeoutError:
                log.warning("proxy worker %d (pid %d) did not exit: killing it", f.index, f.pid)
                with contextlib.suppress(ProcessLookupError):
                    f.proc.send_signal(signal.SIGKILL)
                await f.proc.wait()
            with contextlib.suppress(FileNotFoundError):
                f.socket.unlink()


def merge(exports: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the `monitor.mirror.export()`s of several workers: per second, per slot, per route and
    per (slot, version) total, counters and histogram buckets add. The first export (the leader's)
    gives what is not a count: a slot's version, first second and current second."""
    if len(exports) == 1:
        return exports[0]
    out: dict[str, Any] = {"now": max(int(e["now"]) for e in exports), "slots": {}, "totals": []}
    for e in exports:
        for name, d in e["slots"].items():
            s = out["slots"].get(name)
            if s is None:
                s = out["slots"][name] = {"version": d["version"], "first": d["first"], "run": d["run"],
                                          "sec": d["sec"], "rows": {}, "routes": {}}
            s["run"] = max(s["run"], d["run"])
            _add_rows(s["rows"], d["rows"])
            for key, r in (d.get("routes") or {}).items():
                mine = s["routes"].setdefault(key, {"run": 0, "rows": {}})
                mine["run"] = max(mine["run"], r.get("run", 0))
                _add_rows(mine["rows"], r.get("rows", []))
    for s in out["slots"].values():
        s["rows"] = _rows_list(s["rows"])
        for r in s["routes"].values():
            r["rows"] = _rows_list(r["rows"])
    totals: dict[tuple[str, str], list[Any]] = {}
    for e in exports:
        for slot, ver, counts, hist, total in e["totals"]:
            t = totals.get((slot, ver))
            if t is None:
                totals[(slot, ver)] = [slot, ver, list(counts), dict((int(b), n) for b, n in hist), float(total)]
                continue
            t[2] = [a + b for a, b in zip(t[2], counts, strict=True)]
            for b, n in hist:
                t[3][int(b)] = t[3].get(int(b), 0) + n
            t[4] += float(total)
    out["totals"] = [[s, v, c, sorted(h.items()), tot] for s, v, c, h, tot in totals.values()]
    return out


def _add_rows(into: dict[int, list[Any]], rows: list[Any]) -> None:
    for t, counts, hist in rows:
        row = into.get(int(t))
        if row is None:
            into[int(t)] = [list(counts), dict((int(b), n) for b, n in hist)]
            continue
        row[0] = [a + b for a, b in zip(row[0], counts, strict=True)]
        for b, n in hist:
            row[1][int(b)] = row[1].get(int(b), 0) + n


def _rows_list(rows: dict[int, list[Any]]) -> list[Any]:
    return [[t, c, [[b, n] for b, n in sorted(h.items())]] for t, (c, h) in sorted(rows.items())]


def listeners_on(port: int) -> int:
    """How many sockets listen on `port` on this host (/proc/net/tcp and tcp6; state 0A is LISTEN)."""
    n = 0
    suffix = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(suffix):
                        n += 1
        except OSError:
            continue
    return n


async def unsteer_when_alone(proxy: EmbeddedProxy, size: int, timeout: float = 120.0) -> None:
    """Once only this group listens on the port (a predecessor group has closed its listeners),
    remove the steering program the predecessor left (see `EmbeddedProxy.unsteer`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await loop.run_in_executor(None, listeners_on, proxy.port) <= size:
            proxy.unsteer()
            return
        await asyncio.sleep(0.5)
