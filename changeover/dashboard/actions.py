"""The dashboard's actions: what each would do, said exactly before it is confirmed, and a log
of the ones running or done (shown live on every page).

Every action is one control-API call (client.py). The sentence shown in the confirmation is
computed from the same status the page shows, together with a fingerprint of that status: an
action confirmed against a situation that has changed since (another deploy went live, a
rollback happened) is refused, never carried out against something the user did not see.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from changeover.dashboard.client import Client
from changeover.errors import ChangeoverError

log = logging.getLogger("changeover.dashboard")
ACTIONS = ("rollback", "promote", "stop_standby", "redeploy")
KEEP = 20


@dataclass(frozen=True)
class Plan:
    action: str
    allowed: bool
    text: str
    expect: str
    needs_reason: bool = False
    version: str | None = None
    path: str | None = None


def fingerprint(st: dict[str, Any]) -> str:
    live, standby, dep = st.get("live") or {}, st.get("standby") or {}, st.get("deployment") or {}
    return ":".join(str(x) for x in (live.get("slot"), live.get("version"), standby.get("version"),
                                     standby.get("state"), dep.get("id"), dep.get("phase")))


def switch_estimate(history: list[dict[str, Any]]) -> str:
    """How long the last switch took: what a warm switch back will take."""
    for d in history:
        for s in reversed(d.get("steps") or []):
            if s.get("kind") in ("switch", "switch_back") and s.get("state") == "ok" and s.get("duration"):
                return f"about {s['duration'] * 1000:.1f} ms"
    return "about 1 ms"


def _previous(st: dict[str, Any], history: list[dict[str, Any]]) -> str | None:
    live_version = (st.get("live") or {}).get("version")
    for d in history:
        if d.get("kind") == "deploy" and d.get("state") == "succeeded" and d.get("version") != live_version:
            return str(d["version"])
    return None


def plan(action: str, st: dict[str, Any], history: list[dict[str, Any]], releases: list[dict[str, Any]],
         version: str | None = None) -> Plan:
    fp = fingerprint(st)
    live, standby, dep = st.get("live"), st.get("standby"), st.get("deployment")

    def no(text: str) -> Plan:
        return Plan(action, False, text, fp)

    if action == "rollback":
        if dep:
            if dep["kind"] != "deploy" or dep["phase"] == "rolling_back":
                return no(f"a rollback is already running (deployment #{dep['id']})")
            if dep["phase"] == "observing" and standby:
                return Plan(action, True, f"Stop observing {dep['version']} and switch back to {standby['version']} "
                            f"on {standby['slot']}, warm: {switch_estimate(history)}. {dep['version']} on "
                            f"{dep['slot']} is then stopped.", fp, needs_reason=True)
            step = f" (now at: {dep['step']})" if dep.get("step") else ""
            what = live["version"] if live else "nothing"
            return Plan(action, True, f"Abort the deploy of {dep['version']}{step}: what it started is stopped and "
                        f"undone; {what} stays live and users see no change.", fp, needs_reason=True)
        if not live:
            return no("nothing is live, so there is nothing to roll back")
        if standby and standby.get("state") == "warm":
            return Plan(action, True, f"Switch back to {standby['version']} on {standby['slot']}, warm: "
                        f"{switch_estimate(history)}. {live['version']} on {live['slot']} stays running as the "
                        "standby.", fp, needs_reason=True)
        target = (standby or {}).get("version") or _previous(st, history)
        if target is None:
            return no(f"no earlier release to roll back to ({live['version']} is the only one deployed)")
        idle = "green" if live["slot"] == "blue" else "blue"
        return Plan(action, True, f"Roll back to {target}, cold (it is not running any more): {target} is started "
                    f"on {idle}, verified privately, switched and observed, about as long as a deploy; "
                    f"{live['version']} serves until the switch.", fp, needs_reason=True)
    if action == "promote":
        obs = (st.get("metrics") or {}).get("observing")
        if not dep or dep["phase"] != "observing" or not obs:
            return no("no deployment is in its observation window")
        kept = f"{standby['version']} on {standby['slot']} stays warm as the standby" if standby else "no standby"
        return Plan(action, True, f"End the observation window of {dep['version']} now ({obs['remaining']:.0f} s "
                    f"left) and finalise it: {dep['version']} stays live, {kept}.", fp)
    if action == "stop_standby":
        if dep:
            return no(f"deployment #{dep['id']} is in progress")
        if not standby:
            return no("no standby is running")
        return Plan(action, True, f"Drain and stop {standby['version']} on {standby['slot']}. A rollback then has to "
                    f"start {standby['version']} again first (cold, about as long as a deploy).", fp)
    if action == "redeploy":
        rel = next((r for r in releases if r["version"] == version), None)
        if rel is None:
            return no(f"no release {version!r} was deployed here")
        if dep:
            return no(f"deployment #{dep['id']} is in progress")
        if live and live.get("version") == version:
            return no(f"{version} is live already")
        if not rel.get("exists"):
            return no(f"{rel['path']} is gone: {version} cannot be deployed from it again")
        idle = "green" if live and live["slot"] == "blue" else "blue"
        serving = f"{live['version']} serves until the switch" if live else "nothing is live until then"
        return Plan(action, True, f"Deploy {version} again from {rel['path']} into {idle}: pre-checks, start, "
                    f"private verification, switch and observation, as `changeover deploy {version} --path "
                    f"{rel['path']}`; {serving}. [app] and [env] are read from changeover.toml as it is now.",
                    fp, version=version, path=rel["path"])
    return no(f"unknown action {action!r}")


@dataclass
class Run:
    id: int
    action: str
    text: str
    actor: str
    started: float = field(default_factory=time.time)
    state: str = "running"          # running | ok | failed
    finished: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "action": self.action, "text": self.text, "actor": self.actor,
                "started": self.started, "state": self.state, "finished": self.finished,
                "events": self.events[-30:], "result": self.result, "error": self.error}


class Runner:
    """Runs confirmed actions in the background (a deploy outlives the request that asked for it,
    as it outlives a CLI that goes away) and keeps the latest ones for the pages."""

    def __init__(self, client: Client, changed: Callable[[], None]) -> None:
        self.client = client
        self.changed = changed
        self.runs: list[Run] = []
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, p: Plan, actor: str, reason: str | None = None) -> Run:
        run = Run(next(self._ids), p.action, p.text, actor)
        self.runs.insert(0, run)
        del self.runs[KEEP:]
        task = asyncio.get_running_loop().create_task(self._go(run, p, reason), name=f"dashboard-{p.action}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.changed()
        return run

    async def _go(self, run: Run, p: Plan, reason: str | None) -> None:
        async def on_event(ev: dict[str, Any]) -> None:
            run.events.append(ev)
            self.changed()

        c = self.client
        try:
            if p.action == "rollback":
                run.result = await c.rollback(reason or "manual rollback from the dashboard", on_event)
            elif p.action == "promote":
                run.result = await c.promote(on_event)
            elif p.action == "stop_standby":
                run.result = await c.stop_standby(on_event)
            elif p.action == "redeploy":
                assert p.version is not None and p.path is not None
                run.result = await c.deploy(p.version, p.path, on_event)
            run.state = "ok"
        except ChangeoverError as e:
            run.state, run.error = "failed", str(e)
        except Exception as e:   # never a traceback on a page: say what happened in plain words
            log.exception("dashboard action %s failed", p.action)
            run.state, run.error = "failed", f"internal error: {type(e).__name__}: {e}"
        finally:
            run.finished = time.time()
            self.changed()

    def find(self, run_id: int) -> Run | None:
        return next((r for r in self.runs if r.id == run_id), None)

    async def close(self) -> None:
        # The daemon carries on what was asked (a CLI going away stops nothing either): only our
        # side of the control connections is dropped.
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
