"""The collector's hook for extra figures (the fleet agent's), and the skew the figures report
(no etcd needed: the scrape reads records the agent keeps)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from changeover.fleet.figures import switch_skew
from changeover.monitor.exposition import ChangeoverCollector, make_registry
from changeover.monitor.metrics import Recorder


def test_a_source_adds_its_families_and_a_failing_one_is_left_out() -> None:
    c = ChangeoverCollector(Recorder())
    c.set_live("blue")

    def good() -> Iterator[Metric]:
        g = GaugeMetricFamily("changeover_fleet_in_sync", "in sync", labels=["host"])
        g.add_metric(["h1"], 1.0)
        yield g

    def broken() -> Iterator[Metric]:
        raise RuntimeError("etcd view not ready")
        yield  # pragma: no cover

    c.add_source(broken)
    c.add_source(good)
    text = generate_latest(make_registry(c, process=False)).decode()
    assert 'changeover_fleet_in_sync{host="h1"} 1.0' in text
    assert "changeover_live_slot" in text and "changeover_deploy_state" in text


def test_switch_skew_is_first_acknowledgement_to_last_of_one_deployment() -> None:
    def rec(at: float | None, dep: str = "d1") -> dict[str, object]:
        return {"results": {dep: {"switch": {"live_at": at} if at else {"state": "switching"}}}}

    records = {"h1": rec(10.000), "h2": rec(10.004), "h3": rec(10.0015), "h4": rec(None), "h5": rec(99.0, "d0")}
    skew = switch_skew(records, "d1")
    assert skew is not None and abs(skew - 0.004) < 1e-9
    assert switch_skew({"h1": rec(10.0)}, "d1") is None      # one host: no spread yet
