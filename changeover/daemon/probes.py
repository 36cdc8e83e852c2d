"""The probes the observer runs during the window, built for one release in one slot.

Each answers "is this still healthy?" for one trigger: the release's database, what the app's
health endpoint says of its database, the critical services, the slot's crashes, and a synthetic
request through the proxy when real traffic is too thin to judge, and paired probes to both
slots' instances at the same moment (the latency trigger's concurrent baseline).
"""

from __future__ import annotations

import httpx

from changeover.checks import db as check_db
from changeover.checks.pre import run_critical
from changeover.config import Config
from changeover.daemon.slots import SlotManager, other
from changeover.monitor.observer import Probes
from changeover.monitor.pairs import paired_probe
from changeover.state_schema import Release


def make_probes(config: Config, slots: SlotManager, release: Release, target: str, proxy_url: str) -> Probes:
    env = release.env
    db_url = env.get(config.checks.pre.database_var)
    timeout = config.monitor.probe_timeout
    health_path = config.app.health_path if config.app is not None else "/health"

    async def db_probe() -> tuple[bool, str]:
        assert db_url is not None
        try:
            out = await check_db.connectivity(db_url, timeout)
        except Exception as e:
            return False, str(e)[:300]
        return out.ok, out.detail

    async def health_probe() -> tuple[bool, str]:
        # Judges only what the app says of its database connection. An instance that is down
        # or unreachable is the crash-loop and error-rate triggers' business, not a database
        # verdict, so it counts as "no news" here.
        ups = slots.supervisor.upstreams(target)
        if not ups:
            return True, f"slot {target} has no ready instance (left to the crash-loop trigger)"
        host, port = ups[0]
        try:
            async with httpx.AsyncClient(timeout=timeout) as http:
                r = await http.get(f"http://{host}:{port}{health_path}")
        except httpx.HTTPError as e:
            return True, f"GET {health_path}: {type(e).__name__} (left to the other triggers)"
        try:
            body = r.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and str(body.get("db", "ok")).lower() not in ("ok", "up", "true"):
            return False, f"health reports db={body.get('db')}: {body.get('db_error', '')}"[:300]
        return True, f"GET {health_path} -> {r.status_code}"

    async def critical() -> list[tuple[str, bool, str]]:
        return [(r.name, r.ok, r.detail) for r in await run_critical(config.checks, env)]

    async def crashes(since: float) -> int:
        return slots.crash_count(target, since)

    smoke = config.checks.smoke[0] if config.checks.smoke else None

    async def synthetic() -> None:
        path = smoke.path if smoke is not None else health_path
        try:
            async with httpx.AsyncClient(timeout=timeout, verify=False) as http:   # our own proxy
                await http.get(proxy_url + path)
        except httpx.HTTPError:
            pass  # the proxy recorded it; that is the point

    async def paired() -> tuple[float, float] | None:
        # the smoke request (a GET the config already runs against every release) or health
        new, old = slots.supervisor.upstreams(target), slots.supervisor.upstreams(other(target))
        if not new or not old:
            return None
        path = smoke.path if smoke is not None else health_path
        return await paired_probe(new[0], old[0], path, timeout)

    has_critical = any(s.critical for s in config.checks.pre.services)
    return Probes(db_probe=db_probe if db_url else None, health_probe=health_probe,
                  critical=critical if has_critical else None, crashes=crashes, synthetic=synthetic,
                  paired=paired)

