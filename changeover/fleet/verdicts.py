"""What the coordinator concludes from the hosts' records in etcd: the fleet's own rollback
trigger (the sum of the hosts' observed traffic), and what `status` says about a deployment in
etcd (running, or left by a coordinator that stopped, and what settles it)."""

from __future__ import annotations

from typing import Any

from changeover.fleet.model import PREPARE, PROMOTE, SWITCH, Desired

FINAL = ("succeeded", "rolled_back", "failed", "aborted")


def explain(d: Desired | None, lock: Any, hosts: dict[str, Any], record: Any) -> str | None:
    """What `status` says about the deployment in etcd: running, or left by a coordinator that
    stopped, and what settles it."""
    if d is None:
        return None
    if isinstance(lock, dict):
        return f"{lock.get('what')} in progress ({lock.get('holder')}, pid {lock.get('pid')} on {lock.get('host')})"
    if d.action == PREPARE and d.held:
        return (f"{d.version} is prepared fleet-wide: `changeover switch` puts it live, `changeover abort` "
                "drops it")
    if d.action == PREPARE:
        return (f"deployment {d.id} of {d.version} was left before its switch (its coordinator stopped); nothing "
                "users see changed: the next deploy aborts it, `changeover abort` drops it now")
    state = record.get("state") if isinstance(record, dict) else None
    if d.action in (SWITCH, PROMOTE):
        observing = sorted(h for h, r in hosts.items() if (r.get("deployment") or {}).get("version") == d.version
                           and (r.get("deployment") or {}).get("phase") == "observing")
        if observing:
            return (f"{d.version} is live, in its observation window on {', '.join(observing)} without a "
                    "coordinator: each host still judges its own traffic and rolls the fleet back on a trigger; "
                    "`changeover promote` ends the window, `changeover rollback` undoes it")
        if state not in FINAL:
            return (f"{d.version} is live; its coordinator stopped after the switch, before recording the end "
                    "(the next deploy records it)")
        return None
    if state not in FINAL:
        return f"{d.action} of {d.version} left by a process that stopped; the next deploy records it"
    return None


def fleet_trigger(records: dict[str, dict[str, Any]], hosts: list[str], monitor: Any) -> dict[str, Any] | None:
    """The fleet judges the sum of its hosts' observed traffic with the hosts' own error-rate rule
    (Wilson lower bound above `error_rate`), so a fault spread thin over many hosts is still seen."""
    if monitor is None:
        return None
    from changeover.monitor.triggers import wilson_lower, z_for

    requests = errors = 0
    per: dict[str, Any] = {}
    for h in hosts:
        obs = records.get(h, {}).get("observing") or {}
        n = int(obs.get("requests") or 0)
        raw = obs.get("errors")
        e = int(raw) if raw is not None else round(float(obs.get("error_rate") or 0) * n)
        requests, errors = requests + n, errors + e
        per[h] = {"requests": n, "errors": e}
    if requests < monitor.min_requests or requests == 0:
        return None
    lower = wilson_lower(errors, requests, z_for(monitor.confidence))
    if lower <= monitor.error_rate:
        return None
    return {"reason": "error_rate", "requests": requests, "errors": errors, "lower_bound": round(lower, 5),
            "threshold": monitor.error_rate, "hosts": per,
            "message": f"error rate {errors / requests:.1%} ({errors}/{requests}) over the fleet above "
                       f"{monitor.error_rate:.1%}"}
