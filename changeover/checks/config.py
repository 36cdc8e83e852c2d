"""[checks] sections of changeover.toml -> typed, validated check definitions.

Everything a check needs is decided here, so the runners never meet a malformed definition: a
typo, a bad status, a flow step using a `{{value}}` no earlier step captures, or a session naming
a missing flow is a ConfigError naming the file and the key. docs/checks.md is the reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from changeover.tables import Table

DEFAULT_TIMEOUT = 10.0              # seconds, per check, unless the check sets its own `timeout`
DEFAULT_METHOD = "GET"
DEFAULT_DATABASE_VAR = "DATABASE_URL"
DEFAULT_REDIS_VAR = "REDIS_URL"
DEFAULT_VERSION_FIELD = "version"
DEFAULT_HEADROOM = 0                # connections kept free on top of the green pool
MODES = ("auto", "required", "off")  # auto: checked when the variable is set in the release env
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class Expect:
    """What a response must satisfy. status () means any 2xx; json None means no JSON check."""

    status: tuple[int, ...] = ()
    contains: tuple[str, ...] = ()
    json: Any = None
    max_latency: float | None = None


@dataclass(frozen=True)
class Request:
    """One HTTP request with expectations: a smoke test, a live endpoint, or a flow step.
    capture maps a variable name to a dotted JSON path in the response ("cart.items.0.id")."""

    name: str
    method: str = DEFAULT_METHOD
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str | None = None
    json: Any = None
    expect: Expect = field(default_factory=Expect)
    capture: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Flow:
    name: str
    steps: tuple[Request, ...]
    timeout: float = DEFAULT_TIMEOUT   # for the whole flow


@dataclass(frozen=True)
class Service:
    """A dependency the app needs: reachable over TCP, or a command exiting 0 (run without a shell).
    critical: the monitor re-runs it after the switch (`run_critical`)."""

    name: str
    tcp: tuple[str, int] | None = None
    command: tuple[str, ...] | None = None
    critical: bool = False
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Integrity:
    """SQL that must return no rows, or one row whose single column is true."""

    name: str
    sql: str
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Budget:
    """During a deploy both slots hold pools: the green one must fit in what is left."""

    green_pool: int
    headroom: int = DEFAULT_HEADROOM
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class PreConfig:
    database: str = "auto"
    database_var: str = DEFAULT_DATABASE_VAR
    redis: str = "auto"
    redis_var: str = DEFAULT_REDIS_VAR
    endpoints: tuple[Request, ...] = ()
    services: tuple[Service, ...] = ()
    integrity: tuple[Integrity, ...] = ()
    connections: Budget | None = None
    timeout: float = DEFAULT_TIMEOUT   # database and redis checks


@dataclass(frozen=True)
class VersionCheck:
    """field: dotted JSON path in the health response that must equal API_VERSION.
    path: None means the app's health_path ([app] health_path)."""

    field: str = DEFAULT_VERSION_FIELD
    path: str | None = None
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class SessionCheck:
    """flow signs in (through the proxy while blue is live); verify must still pass after the
    switch with the same cookie jar and the values the flow captured."""

    flow: Flow
    verify: Request
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class ChecksConfig:
    timeout: float = DEFAULT_TIMEOUT
    pre: PreConfig = field(default_factory=PreConfig)
    version: VersionCheck | None = None
    smoke: tuple[Request, ...] = ()
    flows: tuple[Flow, ...] = ()
    session: SessionCheck | None = None

    def flow(self, name: str) -> Flow | None:
        return next((f for f in self.flows if f.name == name), None)


# -- reading ----------------------------------------------------------------------------------

def _json_value(t: Table, key: str, value: Any) -> Any:
    """TOML values that have a JSON form (TOML dates do not)."""
    if isinstance(value, dict):
        return {k: _json_value(t, f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(t, f"{key}[{i}]", v) for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise t.error(key, "JSON-compatible values (strings, numbers, booleans, arrays, tables)", value)


def _templates(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(TEMPLATE.findall(value))
    if isinstance(value, dict):
        return set().union(*(_templates(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_templates(v) for v in value)) if value else set()
    return set()


def _check_templates(t: Table, key: str, value: Any, known: set[str]) -> None:
    unknown = sorted(_templates(value) - known)
    if unknown:
        have = ", ".join(sorted(known)) or "none"
        raise t.error(key, f"only values captured by earlier steps in {{{{...}}}} (captured: {have})",
                      "{{" + unknown[0] + "}}")


def _timeout(t: Table, default: float) -> float:
    """A check's `timeout`: zero would fail every check at once, so it must be positive."""
    v: float = t.duration("timeout", default)
    if v <= 0:
        raise t.error("timeout", "a duration > 0, e.g. '5s'", t.data["timeout"])
    return v


def _status(t: Table) -> tuple[int, ...]:
    v = t.raw("status", [])
    items = v if isinstance(v, list) else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) and 100 <= x <= 599 for x in items):
        raise t.error("status", "an HTTP status 100-599 or a list of them", v)
    return tuple(items)


def _expect(t: Table, known: set[str]) -> Expect:
    status = _status(t)
    contains_raw = t.raw("contains", [])
    contains = [contains_raw] if isinstance(contains_raw, str) else contains_raw
    if not isinstance(contains, list) or not all(isinstance(x, str) and x for x in contains):
        raise t.error("contains", "a non-empty string or a list of them", contains_raw)
    _check_templates(t, "contains", contains, known)
    expect_json = _json_value(t, "json", t.raw("json")) if t.has("json") else None
    _check_templates(t, "json", expect_json, known)
    max_latency = t.duration("max_latency", None)
    t.finish()
    return Expect(status=status, contains=tuple(contains), json=expect_json, max_latency=max_latency)


def _request(t: Table, timeout: float, known: set[str], default_name: str | None = None) -> Request:
    method = t.str("method", DEFAULT_METHOD).upper()
    if method not in METHODS:
        raise t.error("method", "one of " + ", ".join(METHODS), method)
    path = t.str("path")
    if not path.startswith(("/", "{{")):
        raise t.error("path", "a path starting with '/'", path)
    _check_templates(t, "path", path, known)
    headers = t.str_map("headers", {})
    _check_templates(t, "headers", headers, known)
    body = t.str("body", None)
    body_json = _json_value(t, "json", t.raw("json")) if t.has("json") else None
    if body is not None and t.has("json"):
        raise t.error("json", "either body or json, not both", body_json)
    _check_templates(t, "body", body, known)
    _check_templates(t, "json", body_json, known)
    expect = _expect(t.table("expect"), known)
    capture = t.str_map("capture", {})
    for var in capture:
        if not _NAME.match(var):
            raise t.error(f"capture.{var}", "a variable name of letters, digits and _", var)
    name = t.str("name", default_name or f"{method} {path}")
    req = Request(name=name, method=method, path=path, headers=headers, body=body, json=body_json,
                  expect=expect, capture=capture, timeout=_timeout(t, timeout))
    t.finish()
    return req


def _flow(t: Table, timeout: float) -> Flow:
    name = t.str("name")
    flow_timeout = _timeout(t, timeout)
    steps_tables = t.tables("steps")
    if not steps_tables:
        raise t.error("steps", "at least one step ([[checks.flow.steps]])")
    known: set[str] = set()
    steps = []
    for i, st in enumerate(steps_tables, 1):
        step = _request(st, flow_timeout, known, default_name=None)
        if not st.has("name"):
            step = replace(step, name=f"step {i}: {step.method} {step.path}")
        steps.append(step)
        known |= set(step.capture)
    t.finish()
    return Flow(name=name, steps=tuple(steps), timeout=flow_timeout)


def _service(t: Table, timeout: float) -> Service:
    tcp_raw = t.str("tcp", None)
    command = t.str_list("command", None, nonempty=True)
    if (tcp_raw is None) == (command is None):
        raise t.error("tcp", "exactly one of tcp = \"host:port\" or command = [\"prog\", \"arg\"...]")
    tcp = None
    if tcp_raw is not None:
        m = _HOST_PORT.match(tcp_raw)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise t.error("tcp", "HOST:PORT, e.g. 'db.internal:5432'", tcp_raw)
        tcp = (m.group(1).strip("[]"), int(m.group(2)))
    name = t.str("name", tcp_raw if tcp_raw is not None else (command or ["?"])[0])
    svc = Service(name=name, tcp=tcp, command=tuple(command) if command else None,
                  critical=t.bool("critical", False), timeout=_timeout(t, timeout))
    t.finish()
    return svc


def _mode(t: Table, key: str) -> str:
    v = t.raw(key, "auto")
    if v is True:
        return "required"
    if v is False:
        return "off"
    if v not in MODES:
        raise t.error(key, "true, false, or one of " + ", ".join(repr(m) for m in MODES), v)
    return str(v)


def _unique(t: Table, key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise t.error(f"{key}[{i}].name", "a name not used by another entry", n)
        seen.add(n)


def _pre(t: Table, timeout: float) -> PreConfig:
    pre_timeout = _timeout(t, timeout)
    database, redis = _mode(t, "database"), _mode(t, "redis")
    database_var = t.str("database_var", DEFAULT_DATABASE_VAR)
    redis_var = t.str("redis_var", DEFAULT_REDIS_VAR)
    endpoints = tuple(_request(x, pre_timeout, set()) for x in t.tables("endpoints"))
    services = tuple(_service(x, pre_timeout) for x in t.tables("services"))
    _unique(t, "services", [s.name for s in services])
    integrity = []
    for i, x in enumerate(t.tables("integrity")):
        sql = x.str("sql")
        if not sql.strip():
            raise x.error("sql", "a non-empty SQL query", sql)
        integrity.append(Integrity(name=x.str("name", f"integrity #{i + 1}"), sql=sql,
                                   timeout=_timeout(x, pre_timeout)))
        x.finish()
    _unique(t, "integrity", [c.name for c in integrity])
    budget = None
    if t.has("connections"):
        c = t.table("connections")
        budget = Budget(green_pool=c.int("green_pool", min=1),
                        headroom=c.int("headroom", DEFAULT_HEADROOM, min=0),
                        timeout=_timeout(c, pre_timeout))
        c.finish()
    t.finish()
    return PreConfig(database=database, database_var=database_var, redis=redis, redis_var=redis_var,
                     endpoints=endpoints, services=services, integrity=tuple(integrity),
                     connections=budget, timeout=pre_timeout)


def load(t: Table, env: dict[str, str]) -> ChecksConfig:
    """env is accepted for symmetry with the other sections; ${VAR} is already resolved."""
    timeout = _timeout(t, DEFAULT_TIMEOUT)
    pre = _pre(t.table("pre"), timeout)

    version = None
    if t.has("version"):
        v = t.table("version")
        path = v.str("path", None)
        if path is not None and not path.startswith("/"):
            raise v.error("path", "a path starting with '/'", path)
        version = VersionCheck(field=v.str("field", DEFAULT_VERSION_FIELD), path=path,
                               timeout=_timeout(v, timeout))
        if not version.field or any(not p for p in version.field.split(".")):
            raise v.error("field", "a dotted JSON path like 'version' or 'build.version'", version.field)
        v.finish()

    smoke = tuple(_request(x, timeout, set()) for x in t.tables("smoke"))
    _unique(t, "smoke", [s.name for s in smoke])
    flows = tuple(_flow(x, timeout) for x in t.tables("flow"))
    _unique(t, "flow", [f.name for f in flows])

    session = None
    if t.has("session"):
        s = t.table("session")
        flow_name = s.str("flow")
        flow = next((f for f in flows if f.name == flow_name), None)
        if flow is None:
            names = ", ".join(repr(f.name) for f in flows) or "none defined"
            raise s.error("flow", f"the name of a [[checks.flow]] (flows: {names})", flow_name)
        known = set().union(*(set(st.capture) for st in flow.steps))
        session_timeout = _timeout(s, flow.timeout)
        verify = _request(s.table("verify"), session_timeout, known, default_name="session verify")
        session = SessionCheck(flow=flow, verify=verify, timeout=session_timeout)
        s.finish()
    t.finish()
    return ChecksConfig(timeout=timeout, pre=pre, version=version, smoke=smoke, flows=flows, session=session)
