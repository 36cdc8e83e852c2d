"""The fleet coordinator: `changeover deploy` (and switch, promote, abort, rollback) with `[fleet]`,
from any host or from an operator machine that has only the config.

    lock      the fleet deploy lock, a key on the coordinator's own etcd lease (kept alive while it
              runs; a coordinator that dies lets it expire: no stale lock)
    settle    a deployment a dead coordinator left before its switch is aborted first
    migrate   expand migrations run once, here, before any host prepares (their own migration
              step then finds nothing to apply)
    prepare   one write of the desired state; every host prepares in parallel and streams its steps
    barrier   every host prepared (or `min_ready`); if not, abort everywhere: nothing users see changed
    switch    ONE write; every daemon watches the key and flips its proxy on the event; the skew
              (first host live to last) is measured from the hosts' own reports
    observe   each host judges its own traffic; the coordinator judges the fleet's sum; any trigger
              (a host's or the sum's) rolls the whole fleet back with one write
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import time
from collections.abc import Callable
from typing import Any

from changeover.errors import DeployInProgress
from changeover.fleet.config import FleetConfig
from changeover.fleet.etcd import EtcdError, EtcdUnavailable
from changeover.fleet.model import ABORT, PREPARE, PROMOTE, ROLLBACK, SWITCH, Desired, new_id
from changeover.fleet.model import fault_pause as _pause
from changeover.fleet.verdicts import FINAL, fleet_trigger
from changeover.fleet.view import FleetError, FleetView, Progress


class FleetLocked(DeployInProgress):
    """Another coordinator holds the fleet deploy lock (the message names it)."""


def actor() -> str:
    try:
        return f"{getpass.getuser()}@{os.uname().nodename}"
    except (KeyError, OSError):
        return "unknown"


class Coordinator(FleetView):
    def __init__(self, cfg: FleetConfig, progress: Progress | None = None) -> None:
        super().__init__(cfg, progress)
        self._lease = 0
        self._keep: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._keep is not None:
            self._keep.cancel()
            with contextlib.suppress(BaseException):
                await self._keep
        if self._lease:
            with contextlib.suppress(EtcdUnavailable, EtcdError):
                await self.etcd.revoke(self._lease)   # frees the lock at once
        await super().close()

    # -- the lock -----------------------------------------------------------------------------------
    async def acquire(self, what: str) -> None:
        lease = await self.etcd.grant(self.cfg.lock_ttl)
        me = {"holder": actor(), "host": os.uname().nodename, "pid": os.getpid(), "since": time.time(), "what": what}
        ok, kv, _ = await self.etcd.put_if(self.keys.lock, me, absent=True, lease=lease)
        if not ok:
            with contextlib.suppress(EtcdUnavailable, EtcdError):
                await self.etcd.revoke(lease)
            h = (kv.json() if kv else None) or {}
            since = time.strftime("%H:%M:%S", time.localtime(float(h.get("since", 0))))
            raise FleetLocked(f"the fleet ({self.cfg.prefix}) is locked by {h.get('holder')} (pid {h.get('pid')} on "
                              f"{h.get('host')}) since {since}: {h.get('what')}. Wait for it; if that coordinator "
                              f"died, its lock expires within {self.cfg.lock_ttl:g}s")
        self._lease = lease
        self._keep = asyncio.get_running_loop().create_task(self._keepalive(lease))

    async def _keepalive(self, lease: int) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.lock_ttl / 4)
            try:
                if not await self.etcd.keepalive(lease):
                    self.lock_lost = True
                    return
                last = time.monotonic()
            except (EtcdUnavailable, EtcdError):
                if time.monotonic() - last > self.cfg.lock_ttl:
                    self.lock_lost = True
                    return

    async def write(self, d: Desired) -> int:
        """The desired state, only over the one we last saw (nobody else changed it meanwhile)."""
        ok, _, rev = await self.etcd.put_if(self.keys.desired, d.wire(), mod_revision=self.desired_rev)
        if not ok:
            raise FleetError("the desired state was changed by someone else meanwhile (a rollback?); "
                             "see `changeover status`")
        self.desired, self.desired_rev = d, rev
        return rev

    async def record(self, d: Desired, state: str, **extra: Any) -> None:
        hosts = {h: self.records.get(h, {}).get("results", {}).get(d.id, {}) for h in d.hosts}
        kv, _ = await self.etcd.get(self.keys.deploy(d.id))
        old = (kv.json() if kv else None) or {"started_at": time.time()}
        await self.etcd.put(self.keys.deploy(d.id), {
            **old, **extra, "id": d.id, "version": d.version, "from": d.previous, "by": d.by, "state": state,
            "reason": d.reason, "hosts": hosts, "finished_at": time.time() if state in FINAL else None})

    # -- verbs -------------------------------------------------------------------------------------
    async def deploy(self, version: str, path: str, env: dict[str, str], *, no_switch: bool = False,
                     migrate: Callable[[], str | None] | None = None, monitor: Any = None) -> dict[str, Any]:
        await self.acquire(f"deploy {version}")
        await self.follow()
        await self.settle()
        hosts = sorted(self.records)
        if not hosts:
            raise FleetError(f"no host is registered in the fleet {self.cfg.prefix!r}: start `changeover serve` "
                             "(with the same [fleet]) on each host")
        need = self.cfg.min_ready or len(hosts)
        if need > len(hosts):
            raise FleetError(f"min_ready is {need} but only {len(hosts)} host(s) are registered: {', '.join(hosts)}")
        lives = [v for v in (self.live_of(h) for h in hosts) if v]
        previous = max(set(lives), key=lives.count) if lives else None
        d = Desired(id=new_id(), action=PREPARE, version=version, previous=previous, path=path, env=env,
                    hosts=hosts, by=actor(), at=time.time())
        self.say(f"fleet deployment {d.id}: {version} to {len(hosts)} host(s) ({', '.join(hosts)}), "
                 f"live: {previous or 'nothing'}")
        if migrate is not None:
            self.say(f"migrations (expand), once for the fleet: {await asyncio.to_thread(migrate)}")
        await self.write(d)
        await self.record(d, "preparing")
        ready, failed = await self.barrier(d, need)
        if len(ready) < need:
            why = "; ".join(f"{h}: {e}" for h, e in failed.items())
            await self.unwind(d.but(action=ABORT, reason=f"not enough hosts prepared ({why})"), [*ready, *failed])
            raise FleetError(f"fleet deploy of {version} aborted before the switch: {len(ready)} of {len(hosts)} "
                             f"host(s) prepared, {need} needed ({why})\n{previous or 'nothing'} is still live on "
                             "every host; nothing users see changed")
        for h, e in failed.items():
            self.say(f"{h} is not prepared ({e}): it converges when it can", ok=False)
        await _pause("barrier")
        if no_switch:
            await self.write(d.but(held=True))
            await self.record(d, "prepared")
            return {"state": "prepared", "id": d.id, "version": version, "hosts": self.host_results(d)}
        return await self.switch_and_observe(d, ready, monitor)

    async def switch(self, monitor: Any = None) -> dict[str, Any]:
        await self.acquire("switch")
        await self.follow()
        d = self.desired
        if d is None or d.action != PREPARE or not d.held:
            raise FleetError("nothing is prepared fleet-wide: `changeover deploy VERSION --path DIR --no-switch` "
                             "prepares a release on every host")
        ready = [h for h in d.hosts if self.result(h, d.id, PREPARE).get("state") == "prepared"]
        return await self.switch_and_observe(d, ready, monitor)

    async def barrier(self, d: Desired, need: int) -> tuple[list[str], dict[str, str]]:
        deadline = time.monotonic() + self.cfg.prepare_timeout
        while True:
            ready, failed, pending = [], {}, []
            for h in d.hosts:
                r = self.result(h, d.id, PREPARE)
                if h not in self.records:
                    failed[h] = f"cut off (no heartbeat for {self.cfg.host_ttl:g}s)"
                elif r.get("state") == "prepared":
                    ready.append(h)
                elif r.get("state") in FINAL:
                    failed[h] = str(r.get("error") or r.get("state")).splitlines()[0]
                else:
                    pending.append(h)
            if not pending or len(ready) + len(pending) < need:
                return ready, failed
            if time.monotonic() > deadline:
                failed.update({h: f"not prepared within {self.cfg.prepare_timeout:g}s" for h in pending})
                return ready, failed
            await self.changed(deadline)

    async def switch_and_observe(self, d: Desired, ready: list[str], monitor: Any) -> dict[str, Any]:
        sw = d.but(action=SWITCH, held=False)
        written = time.time()
        await self.write(sw)
        await _pause("switch")
        deadline = time.monotonic() + self.cfg.switch_timeout
        while True:
            lives = {h: self.result(h, d.id, SWITCH) for h in ready}
            if all((r.get("live_at") and (r.get("booked_at") or not r.get("acked"))) or r.get("state") in FINAL
                   for r in lives.values()) \
                    or time.monotonic() > deadline:
                break
            await self.changed(deadline)
        at = {h: float(r["live_at"]) for h, r in lives.items() if r.get("live_at")}
        skew = (max(at.values()) - min(at.values())) * 1000 if at else None
        # The watch event's arrival on each host (before its own switch work): etcd's part of the skew.
        heard = [float(r["event_at"]) for r in lives.values() if r.get("event_at")]
        notify = (max(heard) - min(heard)) * 1000 if heard else None
        # Each host's bookkeeping after its flip (state writes): not seen by users, shown apart.
        booked = [float(r["booked_at"]) for r in lives.values() if r.get("booked_at")]
        books = (max(booked) - min(booked)) * 1000 if booked else None
        # A host whose daemon restarted inside its switch reports the outcome without a live time.
        done = {h for h in ready if lives[h].get("state") == "succeeded"}
        lagging = [h for h in ready if h not in at and h not in done]
        self.say(f"{d.version} is live on {len(at)} host(s) ({', '.join(sorted(at))}); switch skew "
                 f"{skew or 0:.1f} ms, last host {1000 * (max(at.values()) - written) if at else 0:.1f} ms after "
                 "the write", live=True, skew_ms=skew)
        for h in lagging:
            self.say(f"{h} has not switched: out of sync (its health check says 503); it converges when back",
                     ok=False)
        await self.record(sw, "observing", skew_ms=skew, notify_skew_ms=notify, booked_skew_ms=books)
        return await self.observe(sw, sorted(set(at) | done), skew, monitor)

    async def observe(self, d: Desired, switched: list[str], skew: float | None, monitor: Any) -> dict[str, Any]:
        """Until every switched host finalised, or a trigger (a host's, or the fleet sum's) rolled
        the fleet back with one write."""
        while True:
            now = self.desired
            if now is None or now.id != d.id or now.action in (ROLLBACK, ABORT):
                return await self.rolled_back(now or d, switched)
            gone = [h for h in switched if h not in self.records]
            for h in gone:   # cut off or stopped (its lease expired): it converges when back
                self.say(f"{h} is gone (no heartbeat for {self.cfg.host_ttl:g}s): not waited for; it converges "
                         "when back", ok=False)
            switched = [h for h in switched if h not in gone]
            states = {h: self.result(h, d.id, SWITCH).get("state") for h in switched}
            bad = {h: s for h, s in states.items() if s in ("rolled_back", "failed", "aborted")}
            if bad:
                h = next(iter(bad))
                err = str(self.result(h, d.id, SWITCH).get("error") or bad[h]).splitlines()[0]
                await self._roll_back(d.but(action=ROLLBACK, reason=f"{h}: {err}", fired_by=h))
                continue
            if all(s == "succeeded" for s in states.values()):
                await self.record(d, "succeeded", skew_ms=skew)
                return {"state": "succeeded", "id": d.id, "version": d.version, "skew_ms": skew,
                        "hosts": self.host_results(d)}
            fired = fleet_trigger(self.records, switched, monitor)
            if fired is not None:
                self.say(f"fleet trigger: {fired['message']}", ok=False)
                await self._roll_back(d.but(action=ROLLBACK, reason=f"fleet: {fired['message']}", fired_by="fleet",
                                            evidence=fired))
                continue
            await self.changed(time.monotonic() + (monitor.interval if monitor is not None else 0.5))

    async def _roll_back(self, new: Desired) -> None:
        """Write the fleet's rollback; a host whose own trigger fired may have written it first
        (agent): then the write finds the desired state changed, and the watch brings the news."""
        try:
            await self.write(new)
        except FleetError:
            await self.changed(time.monotonic() + 0.5)

    async def rolled_back(self, d: Desired, hosts: list[str]) -> dict[str, Any]:
        await self.settled(d, hosts)
        await self.record(d, "rolled_back")
        back = [h for h in hosts if self.live_of(h) == d.previous]
        raise FleetError(f"{d.version} was rolled back fleet-wide: {d.reason}\n{d.previous} is live again on "
                         f"{len(back)} of {len(hosts)} host(s)" + (f" (fired by {d.fired_by})" if d.fired_by else ""))

    async def unwind(self, d: Desired, hosts: list[str]) -> None:
        await self.write(d)
        await self.settled(d, hosts)
        await self.record(d, "aborted")

    async def settled(self, d: Desired, hosts: list[str]) -> None:
        """Wait (up to switch_timeout) until the hosts that can hear us no longer run d.version
        in a deployment and serve d.live."""
        deadline = time.monotonic() + self.cfg.switch_timeout
        while time.monotonic() < deadline:
            busy = [h for h in hosts if h in self.records and (
                (self.records[h].get("deployment") or {}).get("version") == d.version
                or self.live_of(h) != d.live)]
            if not busy:
                return
            await self.changed(deadline)

    async def settle(self) -> None:
        """Before a new deployment: one a dead coordinator left before its switch is aborted."""
        d = self.desired
        if d is None:
            return
        if d.action == PREPARE and d.held:
            raise FleetError(f"{d.version} is prepared fleet-wide (deployment {d.id}, by {d.by}): "
                             "`changeover switch` puts it live, `changeover abort` drops it")
        if d.action == PREPARE:
            self.say(f"settling deployment {d.id} of {d.version}: its coordinator stopped before the switch, "
                     "aborting it")
            await self.unwind(d.but(action=ABORT, reason="its coordinator stopped before the switch"), d.hosts)
            return
        observing = [h for h in d.hosts if (self.records.get(h, {}).get("deployment") or {}).get("phase")
                     in ("observing", "rolling_back") and self.records[h]["deployment"]["version"] == d.version]
        if d.action in (SWITCH, PROMOTE) and observing:
            raise FleetError(f"{d.version} (deployment {d.id}) is still in its observation window on "
                             f"{', '.join(observing)} and its coordinator is gone: `changeover promote` ends the "
                             "window, `changeover rollback` undoes it")
        await self.close_record(d)

    async def close_record(self, d: Desired) -> None:
        """A deployment whose coordinator died after its switch (every host finalised on its own) or
        during a rollback: its record still says it is running; write how it ended."""
        kv, _ = await self.etcd.get(self.keys.deploy(d.id))
        rec = (kv.json() if kv else None) or {}
        if rec.get("state") in FINAL:
            return
        if d.action in (SWITCH, PROMOTE):
            reached = [h for h in d.hosts if h in self.records]
            state = "succeeded" if reached and all(self.live_of(h) == d.version for h in reached) else "failed"
        else:
            state = "aborted" if d.action == ABORT else "rolled_back"
        self.say(f"settling deployment {d.id} of {d.version}: its coordinator stopped after the "
                 f"{'switch' if d.action in (SWITCH, PROMOTE) else d.action}; recorded as {state}")
        await self.record(d, state)

    async def control(self, verb: str, reason: str | None = None) -> dict[str, Any]:
        """promote / abort / rollback of the fleet: one write of the desired state, then wait until
        every host that can hear it has done it. Never blocked by the deploy lock (the emergency exit)."""
        await self.follow()
        d = self.desired
        if d is None:
            raise FleetError(f"no fleet deployment in {self.cfg.prefix!r} yet")
        who = actor()
        if verb == PROMOTE:
            if d.action not in (SWITCH, PROMOTE):
                raise FleetError(f"deployment {d.id} of {d.version} is {d.action}, not live: nothing to promote")
            new = d.but(action=PROMOTE, by=who)
        elif d.action == PREPARE:
            new = d.but(action=ABORT, reason=f"{verb} by {who}: {reason or verb}")
        elif d.action in (SWITCH, PROMOTE):
            if d.previous is None:
                raise FleetError(f"{d.version} was the fleet's first release: nothing to roll back to")
            new = d.but(action=ROLLBACK, reason=f"manual: {reason or verb} (by {who})")
        else:
            raise FleetError(f"deployment {d.id} of {d.version} is already {d.action}: {d.previous} is the "
                             "fleet's release")
        await self.write(new)
        hosts = [h for h in d.hosts if h in self.records]
        if verb == PROMOTE:
            deadline = time.monotonic() + self.cfg.switch_timeout
            while time.monotonic() < deadline and any(
                    self.result(h, d.id, SWITCH).get("state") not in FINAL for h in hosts):
                await self.changed(deadline)
        else:
            await self.settled(new, hosts)
            await self.record(new, "aborted" if new.action == ABORT else "rolled_back")
        return {"state": new.action, "id": d.id, "version": new.live, "from": d.version if new.live != d.version
                else None, "hosts": self.host_results(new)}

def run(cfg: FleetConfig, progress: Progress | None, work: Callable[[Coordinator], Any]) -> Any:
    """Run one coordinator operation to its end; etcd being unreachable is a clear refusal."""
    async def go() -> Any:
        c = Coordinator(cfg, progress)
        try:
            return await work(c)
        except EtcdUnavailable as e:
            raise FleetError(f"etcd cannot serve the fleet ({e}): refused; every host keeps serving what it "
                             "runs") from None
        finally:
            await c.close()

    return asyncio.run(go())
