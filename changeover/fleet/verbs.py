"""The phase verbs a fleet host calls on its own daemon for the desired state (`model.decide`
picks which), mixed into `agent.Agent`: prepare, switch, converge (prepare and switch on a host
back from a partition), follow (a deployment its daemon resumed), promote, abort, rollback, and
report (its own trigger rolled it back before the fleet heard). Each goes through the daemon's
control API handlers, as the CLI's calls do.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from changeover import api
from changeover.errors import ChangeoverError
from changeover.fleet.config import FleetConfig
from changeover.fleet.etcd import Etcd, EtcdError, EtcdUnavailable
from changeover.fleet.model import ABORT, FOLLOW, PROMOTE, REPORT, ROLLBACK, SWITCH, Desired, Facts, Keys

if TYPE_CHECKING:
    from changeover.daemon.server import Daemon

log = logging.getLogger("changeover.fleet")
RETRY = 0.3          # seconds between attempts to reach etcd again
MIGRATION_LOCK_TRIES = 10
ABORT_TRIES = 3


class HostVerbs:
    """What `Agent` provides to its verbs (its state and its report of each verb's outcome)."""

    d: Daemon
    cfg: FleetConfig
    etcd: Etcd
    keys: Keys

    def facts(self) -> Facts:
        raise NotImplementedError

    def _report(self, d: Desired, verb: str, publish: bool = True, **what: Any) -> None:
        raise NotImplementedError

    def _verbs(self) -> dict[str, Callable[[Desired, Callable[[dict[str, Any]], Awaitable[None]]],
                                        Awaitable[dict[str, Any]]]]:
        return {"prepare": self._prepare, SWITCH: self._switch, "converge": self._converge,
                PROMOTE: self._promote, ABORT: self._abort, ROLLBACK: self._rollback, FOLLOW: self._follow,
                REPORT: self._report_rollback}

    def _actor(self, d: Desired) -> str:
        return f"fleet {d.id} ({d.by})" if d.by else f"fleet {d.id}"

    async def _prepare(self, d: Desired, emit: Any) -> dict[str, Any]:
        args = api.DeployArgs(version=d.version, path=d.path, wait=True, env=dict(d.env), actor=self._actor(d),
                              no_switch=True)
        return await self._migration_lock_retried(d, emit, lambda: self.d.h_prepare(api.encode(args), emit))

    async def _migration_lock_retried(self, d: Desired, emit: Any,
                                      run: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The coordinator ran the fleet's migrations before any host prepared; each host's own
        migrations step then finds nothing to apply, but the hosts take the migration runner lock
        at the same moment and all but one are refused. Such a prepare is run again (it failed
        before starting anything), a few times, a fraction of a second apart."""
        for attempt in range(MIGRATION_LOCK_TRIES):
            try:
                return await run()
            except ChangeoverError as e:
                text = str(e)
                if "migrations (expand)" not in text or "holds the lock" not in text \
                        or attempt == MIGRATION_LOCK_TRIES - 1:
                    raise
                await emit({"type": "check", "name": "migrate", "ok": True,
                            "detail": "another host holds the migration lock: preparing again"})
                await asyncio.sleep(0.1 + random.random() * 0.4)
        raise AssertionError("unreachable")

    async def _switch(self, d: Desired, emit: Any) -> dict[str, Any]:
        # Not published now: the heartbeat's etcd calls would share this event loop with the
        # flip; the acknowledgement a few milliseconds later carries it.
        self._report(d, SWITCH, publish=False, state="switching", event_at=time.time())
        return await self.d.h_switch(api.encode(api.SwitchArgs(wait=True, actor=self._actor(d))), emit)

    async def _converge(self, d: Desired, emit: Any) -> dict[str, Any]:
        args = api.DeployArgs(version=d.version, path=d.path, wait=True, env=dict(d.env), actor=self._actor(d))
        return await self._migration_lock_retried(d, emit, lambda: self.d.h_deploy(api.encode(args), emit))

    async def _follow(self, d: Desired, emit: Any) -> dict[str, Any]:
        """The outcome of the deployment this daemon resumed after a restart (see model.FOLLOW)."""
        a = self.d.pipeline.active
        if a is not None and a.version == d.version and a.done is not None:
            result: dict[str, Any] = await asyncio.shield(a.done)
            return result
        last = self.d.state.history(1)
        if last and last[0]["version"] == d.version:
            return {"state": last[0]["state"]}
        return {"state": "succeeded" if self.facts().live == d.version else "failed"}

    async def _promote(self, d: Desired, emit: Any) -> dict[str, Any]:
        return await self.d.h_promote(api.encode(api.PromoteArgs(actor=self._actor(d))), emit)

    async def _abort(self, d: Desired, emit: Any) -> dict[str, Any]:
        why = f"fleet {d.action}: {d.reason or 'aborted'}"
        for _ in range(ABORT_TRIES):
            result = await self.d.h_abort(api.encode(api.AbortArgs(reason=why, actor=self._actor(d))), emit)
            # An abort that lands while the prepare is finishing its start step can find it
            # prepared afterwards: abort again, or the release would stay prepared here for good.
            a = self.d.pipeline.active
            if a is None or a.version != d.version or str(a.phase) not in ("running", "prepared"):
                return result
            log.warning("fleet: %s is still %s after the abort: aborting again", d.version, a.phase)
        return result

    async def _rollback(self, d: Desired, emit: Any) -> dict[str, Any]:
        args = api.RollbackArgs(reason=f"fleet rollback: {d.reason or 'manual'}", actor=self._actor(d))
        return await self.d.h_rollback(api.encode(args), emit)

    def _own_rollback(self, d: Desired) -> str | None:
        """The release of this fleet deployment that this host's own trigger rolled back (its
        newest local deployment), if so: a restart must not make it converge to that release."""
        if d.action not in (SWITCH, PROMOTE):
            return None
        last = self.d.state.history(1)
        dep = last[0] if last else None
        if dep is None or dep["version"] != d.version or dep["state"] != "rolled_back" \
                or not str(dep.get("actor") or "").startswith(f"fleet {d.id}"):
            return None
        if not any(c.get("name") == "rollback trigger" for c in dep.get("checks", [])):
            return None   # rolled back by hand or by the fleet, not judged bad here
        return d.version

    async def _report_rollback(self, d: Desired, emit: Any) -> dict[str, Any]:
        dep = self.d.state.history(1)[0]
        log.warning("fleet: %s was rolled back here by its own trigger before a restart (%s): rolling the "
                    "fleet back instead of converging to it", d.version, dep.get("reason"))
        await self._roll_back_fleet(d, dep)
        return {"state": "rolled_back", "error": dep.get("reason") or "rolled back by this host's trigger"}

    async def _roll_back_fleet(self, d: Desired, dep: dict[str, Any]) -> None:
        """This host's own trigger rolled it back: roll the whole fleet back, with one write that
        carries the evidence (unless someone changed the desired state meanwhile)."""
        evidence = next((c.get("data") for c in dep.get("checks", []) if c.get("name") == "rollback trigger"), None)
        while True:
            try:
                kv, _ = await self.etcd.get(self.keys.desired)
                now = Desired.from_wire(kv.json()) if kv else None
                if kv is None or now is None or now.id != d.id or now.action not in (SWITCH, PROMOTE):
                    return
                new = now.but(action=ROLLBACK, reason=f"{self.cfg.name}: {dep.get('reason')}",
                              fired_by=self.cfg.name, evidence=evidence)
                ok, _, _ = await self.etcd.put_if(self.keys.desired, new.wire(), mod_revision=kv.mod_revision)
                if ok:
                    log.info("fleet: rolled the fleet back (%s)", dep.get("reason"))
                    return
            except (EtcdUnavailable, EtcdError) as e:
                log.warning("fleet: cannot roll the fleet back yet (%s); retrying", e)
                await asyncio.sleep(RETRY)
