"""HTTP checks: one request against expectations, smoke tests, live endpoints, the version check.

`perform` is the engine every HTTP check shares (smoke, endpoints, flow steps, session probe):
it renders `{{value}}` templates, sends the request, and compares status, latency, body and a JSON
subset, reporting every mismatch at once so a failing gate says all that is wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from changeover.checks.config import DEFAULT_TIMEOUT, TEMPLATE, ChecksConfig, Request
from changeover.checks.result import GRACE, CheckResult, Failed, Outcome, passed, run_check, shorten

BODY_SNIPPET = 200  # characters of a response body quoted in a failure
_MISSING: Any = object()


def normalize_url(url: str) -> str:
    """'127.0.0.1:8000' -> 'http://127.0.0.1:8000' (the proxy listen address has no scheme)."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def client(base_url: str, timeout: float = DEFAULT_TIMEOUT, cookies: httpx.Cookies | None = None
           ) -> httpx.AsyncClient:
    # trust_env off: checks target our own proxy and instances, never an HTTP(S)_PROXY from the env.
    # verify off: the proxy's own HTTPS listener on this host ([proxy.tls] https_redirect), whose
    # certificate names the public host, not the loopback address it is reached on here.
    return httpx.AsyncClient(base_url=normalize_url(base_url), timeout=timeout, cookies=cookies,
                             follow_redirects=False, trust_env=False, verify=False)


# -- templates and JSON ----------------------------------------------------------------------

def render(value: Any, values: dict[str, Any]) -> Any:
    """Substitute {{name}} in every string. A string that is exactly one template takes the
    captured value itself (so a numeric id stays a number in a JSON body)."""
    if isinstance(value, str):
        whole = TEMPLATE.fullmatch(value)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]

        def sub(m: Any) -> str:
            v = values.get(m.group(1), m.group(0))
            return v if isinstance(v, str) else json.dumps(v)

        return TEMPLATE.sub(sub, value)
    if isinstance(value, dict):
        return {k: render(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, values) for v in value]
    return value


def render_str(value: str, values: dict[str, Any]) -> str:
    out = render(value, values)
    return out if isinstance(out, str) else json.dumps(out)


def json_path(obj: Any, path: str) -> Any:
    """'cart.items.0.id' into parsed JSON; _MISSING when any part is absent."""
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return _MISSING
    return obj


def json_mismatch(expected: Any, actual: Any, where: str = "") -> str | None:
    """None when `expected` is a subset of `actual`: tables need their keys (recursively), arrays
    need each expected element somewhere in the actual array, scalars must be equal."""
    here = where or "response"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{here}: expected an object, got {json.dumps(actual)[:80]}"
        for k, v in expected.items():
            sub = f"{where}.{k}" if where else k
            if k not in actual:
                return f"{sub}: missing"
            problem = json_mismatch(v, actual[k], sub)
            if problem:
                return problem
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{here}: expected an array, got {json.dumps(actual)[:80]}"
        for i, v in enumerate(expected):
            if not any(json_mismatch(v, a, f"{where}[{i}]") is None for a in actual):
                return f"{here}: no element matches {json.dumps(v)[:80]}"
        return None
    same_type = isinstance(expected, bool) == isinstance(actual, bool)
    if not same_type or expected != actual:
        return f"{here}: expected {json.dumps(expected)}, got {json.dumps(actual)[:80]}"
    return None


# -- one request -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Exchange:
    """What happened on one request, for details and result data."""

    method: str
    path: str
    status: int
    latency: float
    problems: tuple[str, ...]

    def data(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "status": self.status,
                "latency_ms": round(self.latency * 1000, 1)}


async def perform(http: httpx.AsyncClient, req: Request, values: dict[str, Any]) -> Exchange:
    """Send `req` (templates rendered from `values`), check its expectations, and store its
    captures into `values`. Connection errors raise Failed; mismatches are in `problems`."""
    path = render_str(req.path, values)
    headers = {k: render_str(v, values) for k, v in req.headers.items()}
    kwargs: dict[str, Any] = {"headers": headers, "timeout": req.timeout}
    if req.body is not None:
        kwargs["content"] = render_str(req.body, values).encode()
    elif req.json is not None:
        kwargs["json"] = render(req.json, values)
    start = time.perf_counter()
    try:
        resp = await http.request(req.method, path, **kwargs)
    except httpx.TimeoutException:
        raise Failed(f"{req.method} {path}: no response within {req.timeout:g}s") from None
    except httpx.HTTPError as e:
        raise Failed(f"{req.method} {path}: {type(e).__name__}: {e or 'request failed'}") from None
    latency = time.perf_counter() - start

    problems: list[str] = []
    exp = req.expect
    ok_status = resp.status_code in exp.status if exp.status else 200 <= resp.status_code < 300
    if not ok_status:
        want = " or ".join(map(str, exp.status)) if exp.status else "2xx"
        problems.append(f"expected status {want}, got {resp.status_code}")
    if exp.max_latency is not None and latency > exp.max_latency:
        problems.append(f"took {latency * 1000:.0f} ms, max {exp.max_latency * 1000:.0f} ms")
    text = resp.text
    for needle in exp.contains:
        needle = render_str(needle, values)
        if needle not in text:
            problems.append(f"body does not contain {needle!r}")
    parsed: Any = _MISSING
    if exp.json is not None or req.capture:
        try:
            parsed = resp.json()
        except ValueError:
            problems.append("response is not JSON")
    if exp.json is not None and parsed is not _MISSING:
        problem = json_mismatch(render(exp.json, values), parsed)
        if problem:
            problems.append(problem)
    if not problems and parsed is not _MISSING:
        for var, jpath in req.capture.items():
            got = json_path(parsed, jpath)
            if got is _MISSING:
                problems.append(f"cannot capture {var}: no {jpath!r} in the JSON response")
            else:
                values[var] = got
    if problems and text.strip():
        problems.append(f"body: {shorten(text, BODY_SNIPPET)}")
    return Exchange(req.method, path, resp.status_code, latency, tuple(problems))


async def request_outcome(base_url: str, req: Request) -> Outcome:
    async with client(base_url, req.timeout) as http:
        ex = await perform(http, req, {})
    if ex.problems:
        raise Failed(f"{ex.method} {ex.path}: " + "; ".join(ex.problems), ex.data())
    return passed(f"{ex.method} {ex.path} -> {ex.status} in {ex.latency * 1000:.0f} ms", **ex.data())


def labelled(name: str, target: str | None) -> str:
    """'smoke home' -> 'smoke home (blue)': the same test run against several targets."""
    return f"{name} ({target})" if target else name


async def check_request(base_url: str, req: Request, kind: str, target: str | None = None) -> CheckResult:
    return await run_check(labelled(f"{kind} {req.name}", target), kind, req.timeout + GRACE,
                           lambda: request_outcome(base_url, req))


async def run_smoke(cfg: ChecksConfig, base_url: str, *, target: str | None = None) -> list[CheckResult]:
    """Every [[checks.smoke]] against base_url (a green instance, blue for compatibility, or the
    proxy after the switch), concurrently; results in config order. target labels the results
    ("green", "blue", "proxy") so runs against several targets stay apart in the history."""
    return list(await asyncio.gather(*(check_request(base_url, r, "smoke", target) for r in cfg.smoke)))


# -- version ---------------------------------------------------------------------------------

async def check_version(base_url: str, health_path: str, field: str, expected: str,
                        timeout: float = DEFAULT_TIMEOUT) -> CheckResult:
    """The health endpoint's JSON `field` (dotted path) must equal `expected` (API_VERSION):
    catches a wrong build started under the new release."""

    async def check() -> Outcome:
        async with client(base_url, timeout) as http:
            try:
                resp = await http.get(health_path)
            except httpx.HTTPError as e:
                raise Failed(f"GET {health_path}: {type(e).__name__}: {e or 'request failed'}") from None
        try:
            reported = json_path(resp.json(), field)
        except ValueError:
            raise Failed(f"GET {health_path} -> {resp.status_code}, not JSON: "
                         f"{shorten(resp.text, BODY_SNIPPET)}") from None
        if reported is _MISSING:
            raise Failed(f"GET {health_path} -> {resp.status_code}: no field {field!r} in "
                         f"{shorten(resp.text, BODY_SNIPPET)}")
        data = {"expected": expected, "reported": reported}
        if str(reported) != expected:
            raise Failed(f"wrong version: {field} is {reported!r}, expected {expected!r}", data)
        return passed(f"{field} = {expected!r}", **data)

    return await run_check("version", "version", timeout, check)
