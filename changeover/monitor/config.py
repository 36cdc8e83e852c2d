"""[monitor] and [notify] sections of changeover.toml.

Every default is a named constant here and documented in docs/monitoring.md. Cross-key rules
(windows must fit in the kept history, ...) are checked at load so a bad combination is a
ConfigError naming the key, never a surprise during a deploy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from changeover.tables import Table

# -- [monitor] defaults ---------------------------------------------------------------------------
DEFAULT_OBSERVE = 300.0               # observation window after a switch ("5m"); 0 = finalise at once
DEFAULT_INTERVAL = 0.1                # how often traffic triggers are evaluated (~100 µs each)
DEFAULT_WINDOW = 10.0                 # sliding window of the error-rate trigger
DEFAULT_ERROR_RATE = 0.05             # the seed's 5 %
DEFAULT_MIN_REQUESTS = 20             # requests in the window before the error rate is judged
DEFAULT_CONFIDENCE = 0.99             # how sure we must be the true error rate exceeds error_rate
DEFAULT_CONSECUTIVE_FAILURES = 10     # fast path: this many failures in a row trigger at once
DEFAULT_LATENCY_RATIO = 1.5           # green p95 > ratio x baseline p95 ...
DEFAULT_LATENCY_MIN_INCREASE = 0.010  # ... and at least this much slower (sub-ms apps jitter by 2x)
DEFAULT_LATENCY_WINDOW = 5.0          # one latency judgement covers this long
DEFAULT_LATENCY_WINDOWS = 2           # consecutive disjoint windows that must all be slow
DEFAULT_LATENCY_MIN_SAMPLES = 50      # requests per latency window before p95 is trusted
DEFAULT_BASELINE = 60.0               # how much of blue's traffic before the switch makes the baseline
DEFAULT_DB_PROBE_INTERVAL = 1.0
DEFAULT_CRITICAL_INTERVAL = 5.0
DEFAULT_PROBE_FAILURES = 2            # consecutive failed db/critical rounds before a trigger
DEFAULT_PROBE_TIMEOUT = 2.0           # a probe that takes longer has failed
DEFAULT_CRASH_LOOP_CRASHES = 3
DEFAULT_CRASH_LOOP_WITHIN = 60.0
DEFAULT_SYNTHETIC_RATE = 5.0          # smoke requests per second while real traffic is too thin
DEFAULT_KEEP_STANDBY = 600.0          # the old slot stays warm this long after finalising
DEFAULT_HISTORY = 300.0               # per-second buckets kept per slot
DEFAULT_METRICS_LISTEN = "127.0.0.1:9181"
DEFAULT_MAX_ROUTES = 32               # routes judged (and counted) per slot; the rest is "(other)"
DEFAULT_ROUTE_METRICS = False         # per-route Prometheus series (bounded by max_routes)
DEFAULT_PAIRED_PROBES = 4.0           # probe pairs per second to both slots during the window (0 = off)

# -- [notify] defaults ----------------------------------------------------------------------------
EVENTS = ("deploy_started", "failed", "live", "finalised", "rolled_back", "rollback_refused",
          "certificate_issued", "certificate_failed")   # certificate_*: [proxy.tls] (changeover/certs)
FORMATS = ("json", "slack")
DEFAULT_NOTIFY_RETRIES = 3            # attempts after the first one
DEFAULT_NOTIFY_BACKOFF = 0.5          # first retry delay, doubled each time
DEFAULT_NOTIFY_TIMEOUT = 5.0          # per attempt

_LISTEN = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"
    events: frozenset[str] = frozenset(EVENTS)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NotifyConfig:
    webhooks: tuple[Webhook, ...] = ()
    retries: int = DEFAULT_NOTIFY_RETRIES
    backoff: float = DEFAULT_NOTIFY_BACKOFF
    timeout: float = DEFAULT_NOTIFY_TIMEOUT


@dataclass(frozen=True)
class MonitorConfig:
    observe: float = DEFAULT_OBSERVE
    interval: float = DEFAULT_INTERVAL
    window: float = DEFAULT_WINDOW
    error_rate: float = DEFAULT_ERROR_RATE
    min_requests: int = DEFAULT_MIN_REQUESTS
    confidence: float = DEFAULT_CONFIDENCE
    consecutive_failures: int = DEFAULT_CONSECUTIVE_FAILURES
    latency_ratio: float = DEFAULT_LATENCY_RATIO
    latency_min_increase: float = DEFAULT_LATENCY_MIN_INCREASE
    latency_window: float = DEFAULT_LATENCY_WINDOW
    latency_windows: int = DEFAULT_LATENCY_WINDOWS
    latency_min_samples: int = DEFAULT_LATENCY_MIN_SAMPLES
    baseline: float = DEFAULT_BASELINE
    db_probe_interval: float = DEFAULT_DB_PROBE_INTERVAL
    critical_interval: float = DEFAULT_CRITICAL_INTERVAL
    probe_failures: int = DEFAULT_PROBE_FAILURES
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    crash_loop_crashes: int = DEFAULT_CRASH_LOOP_CRASHES
    crash_loop_within: float = DEFAULT_CRASH_LOOP_WITHIN
    synthetic_rate: float = DEFAULT_SYNTHETIC_RATE
    keep_standby: float = DEFAULT_KEEP_STANDBY
    history: float = DEFAULT_HISTORY
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    routes: tuple[str, ...] = ()      # route patterns, see monitor/routes.py
    max_routes: int = DEFAULT_MAX_ROUTES
    route_metrics: bool = DEFAULT_ROUTE_METRICS
    paired_probes: float = DEFAULT_PAIRED_PROBES
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the /metrics endpoint, or None when disabled."""
        if not self.metrics_listen:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)


def _positive(t: Table, key: str, default: float) -> float:
    v: float = t.duration(key, default)
    if v <= 0:
        raise t.error(key, "a duration > 0", t.data[key])
    return v


def _load_monitor(t: Table) -> MonitorConfig:
    d = MonitorConfig
    crash = t.table("crash_loop")
    crashes = crash.int("crashes", DEFAULT_CRASH_LOOP_CRASHES, min=1)
    within = _positive(crash, "within", DEFAULT_CRASH_LOOP_WITHIN)
    crash.finish()

    listen = t.str("metrics_listen", DEFAULT_METRICS_LISTEN)
    if listen:
        m = _LISTEN.fullmatch(listen)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise t.error("metrics_listen", "HOST:PORT, e.g. '127.0.0.1:9181', or '' to disable", listen)

    cfg = MonitorConfig(
        observe=t.duration("observe", d.observe),
        interval=_positive(t, "interval", d.interval),
        window=_positive(t, "window", d.window),
        error_rate=t.float("error_rate", d.error_rate, min=0.0001, max=1.0),
        min_requests=t.int("min_requests", d.min_requests, min=1),
        confidence=t.float("confidence", d.confidence, min=0.5, max=0.999999),
        consecutive_failures=t.int("consecutive_failures", d.consecutive_failures, min=1),
        latency_ratio=t.float("latency_ratio", d.latency_ratio, min=1.0, max=1000.0),
        latency_min_increase=t.duration("latency_min_increase", d.latency_min_increase),
        latency_window=_positive(t, "latency_window", d.latency_window),
        latency_windows=t.int("latency_windows", d.latency_windows, min=1, max=10),
        latency_min_samples=t.int("latency_min_samples", d.latency_min_samples, min=1),
        baseline=_positive(t, "baseline", d.baseline),
        db_probe_interval=_positive(t, "db_probe_interval", d.db_probe_interval),
        critical_interval=_positive(t, "critical_interval", d.critical_interval),
        probe_failures=t.int("probe_failures", d.probe_failures, min=1),
        probe_timeout=_positive(t, "probe_timeout", d.probe_timeout),
        crash_loop_crashes=crashes,
        crash_loop_within=within,
        synthetic_rate=t.float("synthetic_rate", d.synthetic_rate, min=0.0, max=1000.0),
        keep_standby=t.duration("keep_standby", d.keep_standby),
        history=_positive(t, "history", d.history),
        metrics_listen=listen,
        routes=tuple(_route_patterns(t)),
        max_routes=t.int("max_routes", d.max_routes, min=1, max=1000),
        route_metrics=bool(t.bool("route_metrics", d.route_metrics)),
        paired_probes=t.float("paired_probes", d.paired_probes, min=0.0, max=100.0),
    )
    t.finish()
    # Windows are read from the per-second ring, so they must fit in it.
    for key, need in (("window", cfg.window), ("baseline", cfg.baseline),
                      ("latency_window", cfg.latency_window * cfg.latency_windows)):
        if need > cfg.history:
            raise t.error("history", f"a duration >= {key} ({need:g}s) so the window fits in it",
                          t.data.get("history", cfg.history))
    return cfg


def _route_patterns(t: Table) -> list[str]:
    from changeover.monitor.routes import Pattern

    patterns: list[str] = t.str_list("routes", [])
    for p in patterns:
        try:
            Pattern.parse(p)
        except ValueError as e:
            raise t.error("routes", f"route patterns like 'GET /shop/*' or '/static/**' ({e})", p) from None
    return patterns


def _load_webhook(t: Table) -> Webhook:
    url = t.str("url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise t.error("url", "an http:// or https:// URL", url)
    fmt = t.str("format", "json", choices=FORMATS)
    events = t.str_list("events", list(EVENTS), nonempty=True)
    for e in events:
        if e not in EVENTS:
            raise t.error("events", "a list of " + ", ".join(EVENTS), e)
    headers = t.str_map("headers", {})
    t.finish()
    return Webhook(url=url, format=fmt, events=frozenset(events), headers=tuple(sorted(headers.items())))


def _load_notify(t: Table) -> NotifyConfig:
    webhooks = tuple(_load_webhook(w) for w in t.tables("webhooks"))
    cfg = NotifyConfig(
        webhooks=webhooks,
        retries=t.int("retries", DEFAULT_NOTIFY_RETRIES, min=0, max=20),
        backoff=t.duration("backoff", DEFAULT_NOTIFY_BACKOFF),
        timeout=_positive(t, "timeout", DEFAULT_NOTIFY_TIMEOUT),
    )
    t.finish()
    return cfg


def load(monitor: Table, notify: Table, env: dict[str, str]) -> MonitorConfig:
    """`env` is unused: ${VAR} is already resolved by changeover.config (kept for a uniform API)."""
    cfg = _load_monitor(monitor)
    n = _load_notify(notify)
    return replace(cfg, notify=n)
