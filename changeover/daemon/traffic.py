"""Pause and maintenance, the daemon's side (`changeover pause`, `resume`, `maintenance on|off`).

The state holds what the user asked for (`State.set_mode`: the timers `mode.pause`, with the
pause's wall-clock end, and `mode.maintenance`, with its page), written with its history event
*before* the data plane is told, as `rolling_back` is: a daemon killed in between finds the
intent and re-applies it (`restore`), and a resume is never undone by a restart. The data plane
keeps its mode while no daemon runs, and ends a pause at its timeout by itself; a pause whose
end passed while the daemon was away is recorded as resumed and not applied again. A new proxy
worker (a handover, a restart after a crash) is preloaded with the mode before it listens
(`wire`).

While maintenance is on, the checks the pipeline would send through the proxy (pre-deploy
endpoints, the session sign-in, verification after the switch) go to the live slot's instance
directly (`check_url`): users get the page, a deploy still verifies what it puts live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from changeover.daemon.slots import SlotManager
from changeover.daemon.steps import DELAYS
from changeover.errors import ChangeoverError, UsageError
from changeover.proxy.base import ProxySettings
from changeover.proxy.control import ProxyControl, TrafficControl
from changeover.proxy.hold import MAX_PAGE_BYTES, MAX_PAUSE
from changeover.state import State

log = logging.getLogger("changeover.traffic")


def read_page(path: str) -> str:
    """A maintenance page file as text; errors say which file and why."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"maintenance page {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"maintenance page {path}: is a directory, expected an HTML file") from None
    except OSError as e:
        raise UsageError(f"maintenance page {path}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_PAGE_BYTES:
        raise UsageError(f"maintenance page {path}: {len(data)} bytes, at most {MAX_PAGE_BYTES}")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"maintenance page {path}: not UTF-8 text") from None


class TrafficModes:
    def __init__(self, state: State, slots: SlotManager, proxy: ProxyControl,
                 settings: Callable[[], ProxySettings]) -> None:
        self.state = state
        self.slots = slots
        self.proxy = proxy
        self.settings = settings

    def _control(self, proxy: Any = None) -> TrafficControl:
        p = self.proxy if proxy is None else proxy
        if not isinstance(p, TrafficControl):
            s = self.settings()
            raise ChangeoverError(f'[proxy] engine = "{s.engine}" cannot pause traffic or serve a maintenance page; '
                                  'the embedded proxy (engine = "embedded") can')
        return p

    @staticmethod
    async def _fault_point(what: str) -> None:
        """CHANGEOVER_TEST_STEP_DELAY="pause:2": hold between the state's write and the data
        plane's change, so the fault-path tests can kill the daemon exactly there."""
        if DELAYS.get(what):
            await asyncio.sleep(DELAYS[what])

    # -- the verbs -------------------------------------------------------------------------------------
    async def pause(self, timeout: float | None, actor: str | None, why: str | None) -> dict[str, Any]:
        ctl = self._control()
        s = self.settings()
        if getattr(ctl, "can_pause", True) is False:    # refused before anything is recorded
            raise ChangeoverError(f'[proxy] engine = "{s.engine}" cannot hold requests in order (`changeover '
                                  'pause` needs the embedded proxy, engine = "embedded"); `changeover maintenance` '
                                  "works on both")
        timeout = s.pause_timeout if timeout is None else float(timeout)
        if not 0 < timeout <= MAX_PAUSE:
            raise UsageError(f"--timeout {timeout:g}: expected seconds above 0 and at most {MAX_PAUSE:g}")
        until = time.time() + timeout
        self.state.set_mode("pause", True, "paused", due=until, actor=actor, why=why, timeout=timeout, until=until,
                            max_held=s.pause_max_held)
        await self._fault_point("pause")
        try:
            await ctl.pause(timeout, s.pause_max_held)
        except ChangeoverError as e:
            self.state.set_mode("pause", False, "resumed", actor=actor, why=f"the data plane refused the pause: {e}")
            raise
        return await self.status()

    async def resume(self, actor: str | None, why: str | None) -> dict[str, Any]:
        ctl = self._control()
        m = self.state.mode("pause")
        if m is not None:
            since = m[1].get("until", 0) - m[1].get("timeout", 0)
            self.state.set_mode("pause", False, "resumed", actor=actor, why=why,
                                paused_for=round(max(0.0, time.time() - since), 3))
        await self._fault_point("resume")
        released = await ctl.resume()
        return {**await self.status(), "was_paused": m is not None, "released": released}

    async def maintenance(self, on: bool, page: str | None, retry_after: int | None, actor: str | None,
                          why: str | None) -> dict[str, Any]:
        ctl = self._control()
        s = self.settings()
        if not on:
            was = self.state.mode("maintenance") is not None
            if was:
                self.state.set_mode("maintenance", False, "maintenance_off", actor=actor, why=why)
            await self._fault_point("maintenance")
            await ctl.maintenance(False)
            return {**await self.status(), "was_on": was}
        path = page or s.maintenance_page
        text = read_page(path) if path else None
        retry = s.retry_after if retry_after is None else retry_after
        if not 0 <= retry <= 86400:
            raise UsageError(f"--retry-after {retry}: expected whole seconds, 0 to 86400")
        self.state.set_mode("maintenance", True, "maintenance_on", actor=actor, why=why,
                            page=path or "built-in", retry_after=retry, data={"page_text": text})
        await self._fault_point("maintenance")
        try:
            await ctl.maintenance(True, None if text is None else text.encode(), retry)
        except ChangeoverError as e:
            self.state.set_mode("maintenance", False, "maintenance_off", actor=actor,
                                why=f"the data plane refused maintenance: {e}")
            raise
        return await self.status()

    # -- keeping the data plane in the mode ------------------------------------------------------------
    def tick(self) -> None:
        """A pause whose end has passed: the data plane resumed by itself; so does the state."""
        m = self.state.mode("pause")
        if m is not None and time.time() >= m[0]:
            self.state.set_mode("pause", False, "resumed", actor="timeout",
                                why=f"the pause timeout ({m[1].get('timeout', 0):g}s) passed")
            log.info("the pause timeout passed: resumed")

    def wire(self) -> dict[str, Any]:
        """The mode as a proxy worker is preloaded with (ops.Routing["mode"])."""
        self.tick()
        out: dict[str, Any] = {"pause": None, "maintenance": None}
        m = self.state.mode("pause")
        if m is not None:
            out["pause"] = {"timeout": max(0.001, m[0] - time.time()),
                            "max_held": int(m[1].get("max_held") or self.settings().pause_max_held)}
        mt = self.state.mode("maintenance")
        if mt is not None:
            out["maintenance"] = {"page": mt[1].get("page_text"), "retry_after": int(mt[1].get("retry_after", 30))}
        return out

    async def restore(self, proxy: Any = None) -> None:
        """Make the data plane do what the state says (after a daemon start, a proxy restart, a
        handover): the state holds the user's intent."""
        want = self.wire()
        p = self.proxy if proxy is None else proxy
        if not isinstance(p, TrafficControl):
            if want["pause"] or want["maintenance"]:
                log.warning("the state has a pause or maintenance this data plane cannot apply")
            return
        try:
            now = await p.mode() or {}
        except ChangeoverError as e:     # re-asserted anyway: setting a mode twice is harmless
            log.warning("the data plane did not say its mode: %s", e)
            now = {"paused": False, "maintenance": False}
        m = want["maintenance"]
        if m is not None and not now.get("maintenance"):
            page = m["page"]
            await p.maintenance(True, None if page is None else str(page).encode(), int(m["retry_after"]))
            log.info("maintenance re-applied to the data plane")
        elif m is None and now.get("maintenance"):
            await p.maintenance(False)
            log.info("maintenance the state does not have: switched off in the data plane")
        pause = want["pause"]
        if pause is not None and not now.get("paused"):
            await p.pause(float(pause["timeout"]), int(pause["max_held"]))
            log.info("pause re-applied to the data plane (%.1fs left)", pause["timeout"])
        elif pause is None and now.get("paused"):
            await p.resume()
            log.info("a pause the state does not have: resumed in the data plane")

    async def release_for_down(self) -> None:
        """`changeover down`: what a pause holds is sent on before the app stops; a maintenance
        mode stays recorded (the next `serve` shows the page again until `maintenance off`)."""
        if self.state.mode("pause") is not None:
            self.state.set_mode("pause", False, "resumed", actor="down", why="changeover down")
        if isinstance(self.proxy, TrafficControl):
            await self.proxy.resume()

    # -- what status and the pipeline see ----------------------------------------------------------------
    def in_maintenance(self) -> bool:
        return self.state.mode("maintenance") is not None

    def check_url(self, proxy_url: Callable[[], str]) -> Callable[[], str]:
        """The URL the pipeline's checks through the proxy use: the proxy, or in maintenance the
        live slot's instance directly (the proxy answers everyone with the page)."""
        def url() -> str:
            if self.in_maintenance():
                live = self.state.live_slot()
                ups = self.slots.supervisor.upstreams(live) if live else []
                if ups:
                    host, port = ups[0]
                    return f"http://{host}:{port}"
            return proxy_url()
        return url

    async def status(self) -> dict[str, Any]:
        self.tick()
        now: dict[str, Any] = {}
        if isinstance(self.proxy, TrafficControl):
            try:
                now = await self.proxy.mode() or {}
            except ChangeoverError:
                now = {}
        pause = maint = None
        m = self.state.mode("pause")
        if m is not None:
            d = m[1]
            pause = {"since": d.get("until", m[0]) - d.get("timeout", 0), "until": m[0],
                     "remaining": max(0.0, m[0] - time.time()), "timeout": d.get("timeout"), "actor": d.get("actor"),
                     "why": d.get("why"), "held": now.get("held"), "max_held": d.get("max_held")}
        mt = self.state.mode("maintenance")
        if mt is not None:
            d = mt[1]
            maint = {"since": self._since("maintenance_on"), "page": d.get("page"),
                     "retry_after": d.get("retry_after"), "actor": d.get("actor"), "why": d.get("why")}
        mode = "maintenance" if maint else "paused" if pause else "serving"
        return {"mode": mode, "pause": pause, "maintenance": maint}

    def _since(self, kind: str) -> float | None:
        for e in self.state.mode_events(20):
            if e["kind"] == kind:
                return float(e["ts"])
        return None


def merge_history(deployments: list[dict[str, Any]], modes: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Deployments and traffic-mode events in one list, newest first (`history`): a mode event
    is a row of kind "paused", "resumed", "maintenance_on" or "maintenance_off"."""
    rows = [*deployments, *({"id": None, "kind": e["kind"], "version": None, "from": None, "slot": None,
                             "state": e["kind"].replace("_", " "), "reason": e.get("why"), "actor": e.get("actor"),
                             "started_at": e["ts"], "finished_at": None, "checks": [], "steps": [],
                             "detail": {k: v for k, v in e.items() if k not in ("ts", "kind", "why", "actor")}}
                            for e in modes)]
    rows.sort(key=lambda r: -float(r.get("started_at") or 0))
    return rows[:limit]
