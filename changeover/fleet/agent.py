"""The fleet agent inside a host's daemon (`changeover serve` with `[fleet]`).

It registers the host under a lease kept alive by a heartbeat, publishes the host's state (slots,
versions, the deployment in progress, in sync or not, the result of each fleet verb), watches the
desired-state key and calls its own daemon's phase verbs through the daemon's control API
handlers (`model.decide` says which), streaming each step back through etcd.

Cut off from etcd it keeps serving what it has, never flips on its own, and reports itself out of
sync (the health check answers 503). When etcd answers again it reads the desired state as it
is then and converges: switches, or prepares first when it lacks the release.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from changeover.errors import ChangeoverError
from changeover.fleet.config import FleetConfig
from changeover.fleet.etcd import Etcd, EtcdError, EtcdUnavailable
from changeover.fleet.figures import FleetFigures
from changeover.fleet.health import HealthServer
from changeover.fleet.model import (
    FOLLOW,
    REPORT,
    SWITCH,
    Desired,
    Facts,
    Keys,
    decide,
    fault_pause,
)
from changeover.fleet.verbs import RETRY, HostVerbs

if TYPE_CHECKING:
    from changeover.daemon.server import Daemon

log = logging.getLogger("changeover.fleet")
HEALTH_EVERY, HEALTH_REPEAT = 0.1, 5.0   # the proxy's health check: judged this often, re-told this often
CONVERGE_FIRST, CONVERGE_MAX = 1.0, 60.0   # backoff of a failed converge: 1 s, 2 s, 4 s ... 60 s
SWITCH_GRACE = 1.0   # a host flipping to a new desired release is not "lagging" for this long


class Agent(HostVerbs):
    def __init__(self, daemon: Daemon, cfg: FleetConfig) -> None:
        self.d = daemon
        self.cfg = cfg
        self.keys = Keys(cfg)
        self.etcd = Etcd(cfg.etcd, ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file,
                         user=cfg.user, password=cfg.password, timeout=min(2.0, cfg.host_ttl / 3))
        self.desired: Desired | None = None
        self.desired_rev = 0
        self.registered = False       # our lease is alive: we hear the desired state as it changes
        self.reached = 0.0            # when an etcd member last answered (even one without quorum)
        self.done: set[str] = set()   # "<id>:<verb>" called for the desired state
        self.results: dict[str, dict[str, Any]] = {}   # verb -> outcome, for desired.id
        self.results_id: str | None = None
        self._busy: asyncio.Task[None] | None = None   # prepare / switch / converge
        self._changed = asyncio.Event()
        self._publish = asyncio.Event()
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._tasks: list[asyncio.Task[Any]] = []
        self._lease = 0
        self.health: HealthServer | None = None
        self.retry: dict[str, Any] | None = None        # the failed converge being retried
        self.was_live: str | None = None                # the fleet's release before the last change
        self.changed_at = 0.0                           # when the fleet's release last changed
        self.figures = FleetFigures(self)

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        addr = self.health_address()
        if addr is not None:
            self.health = HealthServer(addr[0], addr[1], self.cfg.health_path, self.judge)
            await self.health.start()
        loop = asyncio.get_running_loop()
        for name, coro in (("session", self._session()), ("reconcile", self._reconcile()),
                           ("events", self._send_events()), ("health", self._tell_proxy())):
            self._tasks.append(loop.create_task(coro, name=f"fleet-{name}"))
        self._add_figures()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._busy is not None:
            self._busy.cancel()
        await asyncio.gather(*self._tasks, *([self._busy] if self._busy else []), return_exceptions=True)
        if self._lease:
            with contextlib.suppress(ChangeoverError, Exception):
                async with asyncio.timeout(1.0):
                    await self.etcd.revoke(self._lease)   # leave the fleet at once
        if self.health is not None:
            await self.health.close()
        await self.etcd.close()

    def health_address(self) -> tuple[str, int] | None:
        listen = self.cfg.health_listen
        if listen == "":
            return None
        if listen is None:
            host, _, port = self.d.config.proxy.listen.rpartition(":")
            return host.strip("[]"), int(port) + 1
        host, _, port = listen.rpartition(":")
        return host.strip("[]"), int(port)

    # -- what this host runs -----------------------------------------------------------------------
    def facts(self) -> Facts:
        a = self.d.pipeline.active
        return Facts(live=self.d.slots.version(self.d.state.live_slot()), active=a.version if a else None,
                     phase=str(a.phase) if a else None, busy=self._busy is not None and not self._busy.done())

    async def _tell_proxy(self) -> None:
        """The data plane answers the load balancer's health check on the proxy port ([proxy]
        health_path): tell it whenever the judgement changes, and again every few seconds (a
        proxy handed over meanwhile starts out healthy)."""
        from changeover.proxy.control import HealthControl

        proxy = self.d.proxy
        if not isinstance(proxy, HealthControl):
            return
        told: tuple[bool, str] | None = None
        since = 0.0
        while True:
            ok, body = self.judge()
            now = (ok, str(body.get("why", "")))
            if now != told or time.monotonic() - since > HEALTH_REPEAT:
                try:
                    await proxy.set_health(*now)
                    told, since = now, time.monotonic()
                except ChangeoverError as e:
                    log.warning("fleet: telling the proxy the host's health failed: %s", e)
            await asyncio.sleep(HEALTH_EVERY)

    def connected(self) -> bool:
        return time.monotonic() - self.reached < self.cfg.host_ttl

    def judge(self) -> tuple[bool, dict[str, Any]]:
        """In sync: the host serves the release the fleet wants, as etcd told it recently."""
        f = self.facts()
        want = self.desired.live if self.desired is not None else f.live
        body: dict[str, Any] = {"host": self.cfg.name, "live": f.live, "desired": want,
                                "deployment": self.desired.id if self.desired else None}
        if not self.connected():
            return False, {**body, "in_sync": False, "why": "etcd unreachable: serving what it has, out of sync"}
        if f.live is None:
            return False, {**body, "in_sync": False, "why": "nothing is live on this host"}
        if f.live != want and not self._switching(f):
            return False, {**body, "in_sync": False, "why": f"serves {f.live}, the fleet wants {want}"}
        return True, {**body, "in_sync": True}

    def record(self) -> dict[str, Any]:
        st, slots = self.d.state, self.d.slots
        live = st.live_slot()
        standby = None
        if live is not None:
            from changeover.daemon.model import other

            s = st.slot(other(live))
            if s.state != "empty":
                standby = {"slot": other(live), "version": slots.version(other(live)), "state": str(s.state),
                           "warm": slots.warm(other(live))}
        a = self.d.pipeline.active
        ok, why = self.judge()
        why = self._retry_why(why)
        obs = self.d.telemetry.live_metrics().get("observing") if a is not None else None
        return {
            "name": self.cfg.name, "pid": os.getpid(), "heartbeat": time.time(),
            "health": "http://{}:{}{}".format(*(self.health_address() or ("", 0)), self.cfg.health_path),
            "proxy": self.d.config.proxy.listen,
            "live": {"slot": live, "version": slots.version(live)} if live else None, "standby": standby,
            "deployment": {"id": a.id, "version": a.version, "phase": str(a.phase), "step": a.steps.current}
            if a is not None else None,
            "in_sync": ok, "why": why.get("why"), "desired": self.desired.id if self.desired else None,
            "retry": self.retry,
            "results": {self.results_id: self.results} if self.results_id else {},
            "observing": {k: obs.get(k) for k in ("requests", "errors", "error_rate", "elapsed", "remaining")}
            if isinstance(obs, dict) else None,
        }

    # -- etcd session: lease, heartbeat, watch -----------------------------------------------------
    async def _session(self) -> None:
        while True:
            try:
                self._lease = await self.etcd.grant(self.cfg.host_ttl)
                self.reached = time.monotonic()
                await self.etcd.put(self.keys.host(self.cfg.name), self.record(), lease=self._lease)
                kv, rev = await self.etcd.get(self.keys.desired)
                self._set_desired(kv.json() if kv else None, kv.mod_revision if kv else 0)
                self.registered = True
                log.info("fleet: %s registered (lease %x, prefix %s)", self.cfg.name, self._lease, self.cfg.prefix)
                await self._heartbeat(rev + 1)
            except (EtcdUnavailable, EtcdError) as e:
                if self.registered:
                    log.warning("fleet: lost etcd (%s): serving what this host has, out of sync", e)
                self.registered = False
                self._lease = 0
                await self._reach()
                await asyncio.sleep(RETRY)

    async def _heartbeat(self, from_rev: int) -> None:
        watcher = asyncio.get_running_loop().create_task(self._watch(from_rev))
        try:
            beat = self.cfg.host_ttl / 3
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(beat):
                        await self._publish.wait()
                self._publish.clear()
                if watcher.done():
                    watcher.result()   # raises what broke it
                if not await self.etcd.keepalive(self._lease):
                    raise EtcdUnavailable("the host's lease expired")
                self.reached = time.monotonic()
                await self.etcd.put(self.keys.host(self.cfg.name), self.record(), lease=self._lease)
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher

    async def _watch(self, from_rev: int) -> None:
        async for ev in self.etcd.watch(self.keys.desired, start_revision=from_rev):
            self._set_desired(ev.kv.json() if ev.type == "PUT" else None, ev.kv.mod_revision)

    async def _reach(self) -> None:
        """Without quorum a member still answers a serializable read: then the host knows the
        desired state (and stays in sync) although it cannot act on a change."""
        with contextlib.suppress(EtcdUnavailable, EtcdError):
            kv, _ = await self.etcd.get(self.keys.desired, serializable=True)
            self.reached = time.monotonic()
            d = Desired.from_wire(kv.json()) if kv else None
            if d is not None and (self.desired is None or d.id != self.desired.id or d.action != self.desired.action):
                self.desired = d     # knowledge only: acting waits for the lease (linearizable news)

    def _set_desired(self, data: Any, rev: int) -> None:
        d = Desired.from_wire(data)
        self._note_change(d)
        self.desired, self.desired_rev = d, rev
        if d is not None and d.id != self.results_id:
            self.results_id, self.results = d.id, {}
            self.retry = None
            self.done = {k for k in self.done if k.startswith(d.id + ":")}
        self._changed.set()
        if d is None or d.action != SWITCH:   # a switch is published with its acknowledgement
            self._publish.set()

    # -- acting on the desired state ---------------------------------------------------------------
    async def _reconcile(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            d = self.desired
            if d is None or not self.registered:
                continue
            verb = decide(d, dataclasses.replace(self.facts(), rolled_back=self._own_rollback(d)), self.done)
            if verb is None:
                continue
            self.done.add(f"{d.id}:{verb}")
            log.info("fleet: %s for deployment %s (%s %s)", verb, d.id, d.action, d.version)
            run = self._verbs()[verb]
            if verb in ("prepare", SWITCH, "converge"):
                self._busy = asyncio.get_running_loop().create_task(self._call(d, verb, run))
            else:
                asyncio.get_running_loop().create_task(self._call(d, verb, run))

    async def _call(self, d: Desired, verb: str, run: Callable[..., Awaitable[dict[str, Any]]]) -> None:
        key = SWITCH if verb in ("converge", FOLLOW, REPORT) else verb

        async def emit(ev: dict[str, Any]) -> None:
            await self._on_event(d, key, ev)
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait({"id": d.id, "verb": key, "host": self.cfg.name, "ts": time.time(),
                                         "event": ev})

        try:
            result = await run(d, emit)
            self._report(d, key, state=str(result.get("state")), error=result.get("error"))
            if verb == "converge":
                self.retry = None
        except ChangeoverError as e:
            last = self.d.state.history(1)
            state = last[0]["state"] if last and last[0]["version"] == d.version else "failed"
            if verb in (SWITCH, "converge", FOLLOW) and state == "rolled_back":
                await fault_pause("rolled_back")   # (rolled back here, the fleet not told yet)
            self._report(d, key, state=state, error=str(e))
            if verb in (SWITCH, "converge", FOLLOW) and state == "rolled_back":
                await self._roll_back_fleet(d, last[0])
            elif verb == "converge":
                self._retry_later(d, str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:   # a bug must not stop the agent; the host reports it
            log.exception("fleet: %s failed", verb)
            self._report(d, key, state="failed", error=f"internal error: {e}")
            if verb == "converge":
                self._retry_later(d, f"internal error: {e}")
        finally:
            self._changed.set()

    def _report(self, d: Desired, verb: str, publish: bool = True, **what: Any) -> None:
        if d.id != self.results_id:
            return
        self.results[verb] = {**self.results.get(verb, {}), **what, "at": time.time()}
        if publish:
            self._publish.set()

    async def _send_events(self) -> None:
        """Each step event, in order, to events/<name> (the coordinator watches every revision)."""
        while True:
            ev = await self._events.get()
            if not self.registered:
                continue
            with contextlib.suppress(EtcdUnavailable, EtcdError):
                await self.etcd.put(self.keys.event(self.cfg.name), ev)

    # -- the switch acknowledged at the proxy ------------------------------------------------------
    async def _on_event(self, d: Desired, key: str, ev: dict[str, Any]) -> None:
        """A step event of a fleet verb here. The fleet's switch skew is when the proxies flip, so
        this host tells the proxy itself as soon as the daemon's switch step has begun (the step is
        in the state: a daemon killed now finds the switch and the proxy's live slot, and carries
        on from there as after its own switch) and reports the acknowledgement at once; the daemon's
        own switch then finds the proxy switched and writes its bookkeeping."""
        kind = ev.get("type")
        if kind == "step" and key == SWITCH and ev.get("kind") == "switch" and ev.get("state") == "running":
            a = self.d.pipeline.active
            if a is None or a.version != d.version or not self.d.slots.warm(a.target):
                return
            try:
                await self.d.proxy.switch(a.target)
            except ChangeoverError:
                return   # the daemon's own switch step fails the same way and says why
            self._report(d, key, state="live", live_at=time.time(), live_version=d.version, acked="proxy")
        elif kind == "live":
            mine = self.results.get(key, {}) if d.id == self.results_id else {}
            if mine.get("acked") and mine.get("live_version") == ev.get("version"):
                self._report(d, key, booked_at=time.time())   # the bookkeeping after the flip is done
            else:
                self._report(d, key, state="live", live_at=time.time(), live_version=ev.get("version"),
                             acked=None)

    # -- in sync while flipping --------------------------------------------------------------------
    def _note_change(self, d: Desired | None) -> None:
        old = self.desired.live if self.desired is not None else None
        new = d.live if d is not None else None
        if new != old:
            self.was_live, self.changed_at = old, time.monotonic()

    def _switching(self, f: Facts) -> bool:
        """Right after the fleet's release changed, a host still serving the release wanted just
        before is flipping, not lagging: every host would otherwise answer 503 at once until its
        switch, and a load balancer checking in that moment would take the whole fleet out."""
        return f.live is not None and f.live == self.was_live and time.monotonic() - self.changed_at < SWITCH_GRACE

    # -- a failed converge is retried --------------------------------------------------------------
    def _retry_later(self, d: Desired, error: str) -> None:
        """Converging failed (the release missing on this host, an instance that did not start...):
        try again with backoff for as long as the fleet wants that release."""
        r = self.retry if self.retry is not None and self.retry.get("deployment") == d.id else {}
        attempt = int(r.get("attempt", 0)) + 1
        delay = min(CONVERGE_MAX, CONVERGE_FIRST * 2 ** (attempt - 1))
        self.retry = {"deployment": d.id, "version": d.version, "attempt": attempt,
                      "error": (error.splitlines() or ["failed"])[0], "delay": delay, "next_at": time.time() + delay}
        log.warning("fleet: converging to %s failed (attempt %d: %s); trying again in %gs", d.version, attempt,
                    self.retry["error"], delay)
        self._publish.set()
        asyncio.get_running_loop().call_later(delay, self._retry_now, d.id)

    def _retry_now(self, dep_id: str) -> None:
        if self.desired is None or self.desired.id != dep_id:
            return
        self.done.discard(f"{dep_id}:converge")
        self._changed.set()

    def _retry_why(self, why: dict[str, Any]) -> dict[str, Any]:
        r = self.retry
        if r is None or why.get("in_sync"):
            return why
        left = max(0.0, float(r["next_at"]) - time.time())
        return {**why, "why": f"{why.get('why')}; converging to {r['version']} failed {r['attempt']} time(s) "
                              f"({r['error']}), next try in {left:.0f}s"}

    # -- /metrics ------------------------------------------------------------------------------------
    def _add_figures(self) -> None:
        """The fleet's figures on the daemon's /metrics, when it serves one."""
        telemetry = getattr(self.d, "telemetry", None)
        collector = getattr(telemetry, "collector", None)
        if collector is None or not self.d.config.monitor.metrics_listen:
            return
        collector.add_source(self.figures.collect)
        self._tasks.append(asyncio.get_running_loop().create_task(self.figures.run(), name="fleet-figures"))
