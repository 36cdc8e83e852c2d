"""What `changeover status` shows: the live and standby slots, the deployment under way, the
proxy, the traffic mode, recent incidents and the live metrics (the daemon's `status` op)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from changeover.daemon.model import SlotState, other
from changeover.state import SLOTS

if TYPE_CHECKING:
    from changeover.daemon.server import Daemon

INCIDENTS = ("instance.crashed", "instance.gave_up", "instance.restarted", "instance.lost", "recovery.failed",
             "recovery.restarted", "proxy.restarted", "proxy.restart_failed")


async def report(d: Daemon) -> dict[str, Any]:
    live = d.state.live_slot()
    standby_name = other(live) if live else None
    out: dict[str, Any] = {"live": None, "standby": None, "deploying": d.pipeline.active is not None}
    if live:
        out["live"] = slot_info(d, live)
    if standby_name:
        s = d.state.slot(standby_name)
        if s.state != SlotState.EMPTY:
            info = slot_info(d, standby_name)
            info["state"] = ("warm" if s.state == SlotState.STANDBY and d.slots.warm(standby_name)
                             else s.state)
            timer = d.state.timer("standby_expiry")
            if timer is not None and timer[1].get("slot") == standby_name:
                info["expires_at"] = timer[0]
            out["standby"] = info
    a = d.pipeline.active
    if a is not None:
        out["deployment"] = {"id": a.id, "kind": str(a.kind), "version": a.version, "phase": str(a.phase),
                             "slot": a.target, "started_at": a.started, "step": a.steps.current}
    out["proxy"] = {"listen": d.config.proxy.listen, "pid": d.proxy.pid, "engine": d.config.proxy.engine}
    pids = getattr(d.proxy, "pids", None)   # [proxy] workers: every process of the group, the leader first
    if pids:
        out["proxy"]["workers"] = list(pids)
    kept = d.slots.linger.groups()  # a retired release's processes kept for its tunnels (daemon/linger.py)
    if kept:
        out["tunnels_kept"] = [{"slot": g.get("slot"), "version": g.get("version"), "tunnels": g.get("tunnels"),
                                "until": g.get("due")} for g in kept]
    out.update(await d.traffic.status())   # "mode": serving | paused | maintenance, "pause", "maintenance"
    if d.config.proxy.hosts:        # host routing: this project's names, on a shared front or not
        shared = d.config.proxy.shared
        out["proxy"].update(hosts=list(d.config.proxy.hosts), shared=shared,
                            front_socket=str(getattr(d.proxy, "socket", "")) if shared else None)
    if getattr(d, "certs", None) is not None and d.config.proxy.tls is not None:   # [proxy.tls]
        out["proxy"]["tls"] = {"listen": d.config.proxy.tls.listen, "acme": d.certs.status()}
    out["incidents"] = incidents(d)
    out["metrics"] = d.telemetry.live_metrics()
    return out

def incidents(d: Daemon) -> list[dict[str, Any]]:
    """Crashes and restarts of the last hour: those of what runs now, and those during the latest
    deployment (they explain its outcome); not those of releases replaced since."""
    recent = time.time() - 3600
    latest = d.state.deployments(1)
    last_start = latest[0].started_at if latest else 0.0
    since = {}
    for name in SLOTS:
        rel = d.state.release(d.state.slot(name).release_id)
        since[name] = rel.created_at if rel is not None else None
    out = []
    for e in d.state.events(limit=200):
        if e["ts"] < recent or e["kind"] not in INCIDENTS:
            continue
        if e["kind"].startswith("instance.") and e.get("slot") in since:
            start = since[e["slot"]]
            if e["ts"] < last_start and (start is None or e["ts"] < start):
                continue
        out.append(e)
    return out[:10]

def slot_info(d: Daemon, slot: str) -> dict[str, Any]:
    s = d.state.slot(slot)
    rel = d.state.release(s.release_id)
    ready = d.slots.supervisor.upstreams(slot)
    return {"slot": slot, "version": rel.version if rel else None, "since": s.updated_at,
            "instances": [{"pid": r.pid, "port": r.port, "ready": ("127.0.0.1", r.port) in ready}
                          for r in d.slots.supervisor.records(slot)]}
