from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from changeover.config import load as load_config
from changeover.errors import ConfigError
from changeover.monitor import config as mc
from changeover.tables import Table


def load(monitor: dict[str, Any] | None = None, notify: dict[str, Any] | None = None) -> mc.MonitorConfig:
    return mc.load(Table("changeover.toml", "monitor", monitor or {}),
                   Table("changeover.toml", "notify", notify or {}), {})


def test_defaults() -> None:
    cfg = load()
    assert cfg == mc.MonitorConfig()
    assert (cfg.observe, cfg.interval, cfg.window, cfg.error_rate) == (300.0, 0.1, 10.0, 0.05)
    assert (cfg.min_requests, cfg.consecutive_failures, cfg.latency_ratio, cfg.latency_windows) == (20, 10, 1.5, 2)
    assert cfg.keep_standby == 600.0 and cfg.metrics_address == ("127.0.0.1", 9181)
    assert cfg.notify.webhooks == () and cfg.notify.retries == 3


def test_all_keys() -> None:
    cfg = load({
        "observe": "2m", "interval": "200ms", "window": "20s", "error_rate": 0.02, "min_requests": 50,
        "confidence": 0.95, "consecutive_failures": 5, "latency_ratio": 2, "latency_min_increase": "50ms",
        "latency_window": "10s", "latency_windows": 3, "latency_min_samples": 100, "baseline": "2m",
        "db_probe_interval": "2s", "critical_interval": "10s", "probe_failures": 3, "probe_timeout": "1s",
        "crash_loop": {"crashes": 5, "within": "2m"}, "synthetic_rate": 1, "keep_standby": "1h",
        "history": "10m", "metrics_listen": "[::1]:9000",
    }, {
        "retries": 5, "backoff": "1s", "timeout": "10s",
        "webhooks": [{"url": "https://hooks.example.com/x", "format": "slack", "events": ["rolled_back"],
                      "headers": {"Authorization": "Bearer abc"}},
                     {"url": "http://127.0.0.1:8080/deploys"}],
    })
    assert cfg.observe == 120 and cfg.interval == 0.2 and cfg.latency_ratio == 2.0
    assert (cfg.crash_loop_crashes, cfg.crash_loop_within) == (5, 120.0)
    assert cfg.metrics_address == ("::1", 9000)
    a, b = cfg.notify.webhooks
    assert a.format == "slack" and a.events == frozenset({"rolled_back"})
    assert a.headers == (("Authorization", "Bearer abc"),)
    assert b.format == "json" and b.events == frozenset(mc.EVENTS)
    assert (cfg.notify.retries, cfg.notify.backoff, cfg.notify.timeout) == (5, 1.0, 10.0)


def test_metrics_can_be_disabled() -> None:
    assert load({"metrics_listen": ""}).metrics_address is None


@pytest.mark.parametrize("monitor,notify,key,expect", [
    ({"observ": "5m"}, {}, "monitor.observ", "unknown key (did you mean 'observe'?)"),
    ({"interval": "fast"}, {}, "monitor.interval", "a duration like"),
    ({"interval": 0}, {}, "monitor.interval", "a duration > 0"),
    ({"error_rate": 5}, {}, "monitor.error_rate", "a number between"),
    ({"error_rate": True}, {}, "monitor.error_rate", "a number"),
    ({"min_requests": 0}, {}, "monitor.min_requests", ">= 1"),
    ({"latency_ratio": 0.5}, {}, "monitor.latency_ratio", "between 1.0"),
    ({"crash_loop": {"crashes": 0}}, {}, "monitor.crash_loop.crashes", ">= 1"),
    ({"crash_loop": {"whithin": "1m"}}, {}, "monitor.crash_loop.whithin", "unknown key"),
    ({"crash_loop": 3}, {}, "monitor.crash_loop", "a table"),
    ({"metrics_listen": "9181"}, {}, "monitor.metrics_listen", "HOST:PORT"),
    ({"metrics_listen": "localhost:70000"}, {}, "monitor.metrics_listen", "HOST:PORT"),
    ({"history": "5s"}, {}, "monitor.history", ">= window (10s)"),
    ({"window": "1m", "history": "30s"}, {}, "monitor.history", ">= window (60s)"),
    ({}, {"webhooks": [{"url": "ftp://x"}]}, "notify.webhooks[0].url", "an http:// or https:// URL"),
    ({}, {"webhooks": [{}]}, "notify.webhooks[0].url", "is required"),
    ({}, {"webhooks": [{"url": "http://x", "format": "xml"}]}, "notify.webhooks[0].format", "one of 'json'"),
    ({}, {"webhooks": [{"url": "http://x", "events": ["deployed"]}]}, "notify.webhooks[0].events", "a list of"),
    ({}, {"webhooks": [{"url": "http://x", "events": []}]}, "notify.webhooks[0].events", "non-empty"),
    ({}, {"webhooks": {"url": "http://x"}}, "notify.webhooks", "an array of tables"),
    ({}, {"retries": -1}, "notify.retries", ">= 0"),
    ({}, {"hooks": []}, "notify.hooks", "unknown key"),
])
def test_errors_name_the_key(monitor: dict[str, Any], notify: dict[str, Any], key: str, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(monitor, notify)
    assert e.value.key == key and e.value.file == "changeover.toml"
    assert expect in str(e.value)


def test_through_the_real_config_file(tmp_path: Path) -> None:
    f = tmp_path / "changeover.toml"
    f.write_text('[app]\ncommand = ["./serve"]\n\n[monitor]\nobserve = "90s"\nerror_rate = 0.1\n\n'
                 '[[notify.webhooks]]\nurl = "${HOOK_URL}"\nformat = "slack"\n')
    cfg = load_config(f, {"HOOK_URL": "https://chat.example.com/hook/abc"})
    assert cfg.monitor.observe == 90 and cfg.monitor.error_rate == 0.1
    assert cfg.monitor.notify.webhooks[0].url == "https://chat.example.com/hook/abc"
    f.write_text('[app]\ncommand = ["./serve"]\n[monitor]\nerror_rate = "5%"\n')
    with pytest.raises(ConfigError, match=r"monitor.error_rate: expected a number"):
        load_config(f, {})


def test_route_keys() -> None:
    cfg = load({"routes": ["GET /shop/*", "/static/**"], "max_routes": 8, "route_metrics": True,
                "paired_probes": 0})
    assert cfg.routes == ("GET /shop/*", "/static/**") and cfg.max_routes == 8
    assert cfg.route_metrics and cfg.paired_probes == 0
    assert mc.MonitorConfig().max_routes == 32 and not mc.MonitorConfig().route_metrics


@pytest.mark.parametrize("bad", ["shop/*", "GET /a/**/b", "G3T /x"])
def test_bad_route_pattern_names_the_key(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        load({"routes": [bad]})
    assert "routes" in str(e.value) and bad in str(e.value)
