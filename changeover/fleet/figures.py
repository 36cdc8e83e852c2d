"""The fleet's figures on the daemon's `/metrics` (a source added to its ChangeoverCollector).

Each host exports what it knows of the whole fleet, so any one host's scrape answers "is the
fleet in sync?": hosts in sync / out of sync / unreachable, each host's heartbeat age, the
release the fleet wants, the last switch's skew, and this host's own converge retries.

A scrape is synchronous and must not wait on etcd, so the other hosts' records are read in the
background (one serializable range read per heartbeat) and the scrape uses that copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from changeover.fleet.etcd import EtcdError, EtcdUnavailable
from changeover.fleet.model import SWITCH

if TYPE_CHECKING:
    from changeover.fleet.agent import Agent


class FleetFigures:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.hosts: dict[str, dict[str, Any]] = {}   # hosts/<name> as last read

    async def run(self) -> None:
        """Keep the copy of every host's record current (only while this host is registered)."""
        a = self.agent
        while True:
            if a.registered:
                with contextlib.suppress(EtcdUnavailable, EtcdError):
                    kvs, _ = await a.etcd.get_prefix(a.keys.hosts, serializable=True)
                    self.hosts = {a.keys.name_of(kv.key): v for kv in kvs if isinstance(v := kv.json(), dict)}
            await asyncio.sleep(a.cfg.host_ttl / 3)

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        d = a.desired
        ok, _ = a.judge()
        now = time.time()
        me = GaugeMetricFamily("changeover_fleet_in_sync", "1 when this host serves the release the fleet wants.",
                               labels=["host"])
        me.add_metric([a.cfg.name], 1.0 if ok else 0.0)
        yield me
        conn = GaugeMetricFamily("changeover_fleet_etcd_connected", "1 while etcd answered this host recently.",
                                 labels=["host"])
        conn.add_metric([a.cfg.name], 1.0 if a.connected() else 0.0)
        yield conn

        records = dict(self.hosts)
        if a.registered:
            records[a.cfg.name] = a.record()   # this host's own view is the freshest
        names = sorted(set(records) | set(d.hosts if d else []))
        counts = {"in_sync": 0, "out_of_sync": 0, "unreachable": 0}
        per = GaugeMetricFamily("changeover_fleet_host_in_sync", "1 when the host reports itself in sync.",
                                labels=["host"])
        age = GaugeMetricFamily("changeover_fleet_heartbeat_age_seconds",
                                "Seconds since the host's last heartbeat, as last read from etcd.", labels=["host"])
        for name in names:
            r = records.get(name)
            if r is None:
                counts["unreachable"] += 1
                per.add_metric([name], 0.0)
                continue
            counts["in_sync" if r.get("in_sync") else "out_of_sync"] += 1
            per.add_metric([name], 1.0 if r.get("in_sync") else 0.0)
            age.add_metric([name], max(0.0, now - float(r.get("heartbeat") or now)))
        hosts = GaugeMetricFamily("changeover_fleet_hosts", "Hosts of the fleet by state.", labels=["state"])
        for state, n in counts.items():
            hosts.add_metric([state], float(n))
        yield from (hosts, per, age)

        want = GaugeMetricFamily("changeover_fleet_desired", "1 for the fleet's desired state (the release users "
                                 "should reach, and the deployment's action).",
                                 labels=["deployment", "action", "release"])
        if d is not None:
            want.add_metric([d.id, d.action, d.live or ""], 1.0)
        yield want
        skew = switch_skew(records, d.id) if d is not None else None
        if skew is not None:
            g = GaugeMetricFamily("changeover_fleet_switch_skew_seconds",
                                  "First host live to last in the deployment's switch (proxies' acknowledgements).",
                                  labels=["deployment"])
            g.add_metric([d.id if d else ""], skew)
            yield g
        retry = GaugeMetricFamily("changeover_fleet_converge_failures",
                                  "Failed attempts in a row of this host to converge (retried with backoff).",
                                  labels=["host"])
        retry.add_metric([a.cfg.name], float((a.retry or {}).get("attempt", 0)))
        yield retry


def switch_skew(records: dict[str, dict[str, Any]], dep_id: str) -> float | None:
    """Seconds from the first host's acknowledged switch to the last's, for one deployment."""
    at = []
    for r in records.values():
        res = ((r.get("results") or {}).get(dep_id) or {}).get(SWITCH) or {}
        if res.get("live_at"):
            at.append(float(res["live_at"]))
    return max(at) - min(at) if len(at) > 1 else None
