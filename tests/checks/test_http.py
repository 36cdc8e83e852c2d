"""Version, smoke tests, compatibility and user flows against the real example app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import psycopg

from changeover.checks import check_version, run_flows, run_smoke
from changeover.checks.result import CheckResult
from tests.checks.helpers import checks


def run(coro: object) -> list[CheckResult]:
    return asyncio.run(coro)  # type: ignore[arg-type]


def one(coro: object) -> CheckResult:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_version_right_and_wrong(start_app: Callable[..., str]) -> None:
    good = start_app(API_VERSION="v42")
    r = one(check_version(good, "/health", "version", "v42"))
    assert r.ok and r.data == {"expected": "v42", "reported": "v42"}
    wrong = start_app(API_VERSION="v42", FAULT_VERSION="v41")
    r = one(check_version(wrong, "/health", "version", "v42"))
    assert not r.ok and r.detail == "wrong version: version is 'v41', expected 'v42'"
    r = one(check_version(good, "/health", "build.id", "v42"))
    assert not r.ok and "no field 'build.id'" in r.detail


def test_version_unreachable(closed_port: int) -> None:
    r = one(check_version(f"127.0.0.1:{closed_port}", "/health", "version", "v1"))
    assert not r.ok and "ConnectError" in r.detail


SMOKE = """
[[checks.smoke]]
name = "home"
path = "/"
expect.contains = "hello from"

[[checks.smoke]]
name = "echo json"
method = "POST"
path = "/echo"
json = { order = { id = 7, lines = [1, 2, 3] }, paid = true }
expect = { status = 200, json = { order = { lines = [3] }, paid = true }, max_latency = "5s" }

[[checks.smoke]]
name = "anonymous cart"
path = "/cart"
headers = { Accept = "application/json" }
expect.status = [401, 403]
"""


def test_smoke_passes_on_a_healthy_app(start_app: Callable[..., str]) -> None:
    url = start_app(API_VERSION="v2")
    res = run(run_smoke(checks(SMOKE), url))
    assert [(r.name, r.ok) for r in res] == [("smoke home", True), ("smoke echo json", True),
                                             ("smoke anonymous cart", True)], [r.detail for r in res]
    assert res[0].data["status"] == 200 and "latency_ms" in res[0].data


def test_smoke_fails_with_every_mismatch(start_app: Callable[..., str]) -> None:
    cfg = checks("""
[[checks.smoke]]
name = "strict"
method = "POST"
path = "/echo"
body = '{"paid": false}'
headers = { Content-Type = "application/json" }
expect = { status = 201, contains = "refund", json = { paid = true } }
""")
    [r] = run(run_smoke(cfg, start_app()))
    assert not r.ok
    assert "expected status 201, got 200" in r.detail
    assert "body does not contain 'refund'" in r.detail
    assert "paid: expected true, got false" in r.detail


def test_smoke_fails_on_injected_errors(start_app: Callable[..., str], tmp_path: Path) -> None:
    fault = tmp_path / "fault.json"
    fault.write_text('{"error_rate": 1.0}')
    cfg = checks('[[checks.smoke]]\nname = "home"\npath = "/"')
    [r] = run(run_smoke(cfg, start_app(FAULT_FILE=str(fault))))
    assert not r.ok and "expected status 2xx, got 500" in r.detail and "injected fault" in r.detail


def test_old_code_fails_on_new_schema(pg_url: str, start_app: Callable[..., str]) -> None:
    """Compatibility gate: after the expand migration renamed a column, blue's query breaks."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        c.execute("INSERT INTO items VALUES (1, 'book')")
    cfg = checks('[[checks.smoke]]\nname = "items"\npath = "/items"\nexpect.json = { rows = 1 }')
    blue = start_app(DATABASE_URL=pg_url, ITEMS_QUERY="SELECT name FROM items", API_VERSION="v1")
    green = start_app(DATABASE_URL=pg_url, ITEMS_QUERY="SELECT title FROM items", API_VERSION="v2")
    assert run(run_smoke(cfg, blue))[0].ok
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("ALTER TABLE items RENAME COLUMN name TO title")  # the new schema
    [on_green] = run(run_smoke(cfg, green, target="green"))
    [on_blue] = run(run_smoke(cfg, blue, target="blue"))
    assert on_green.ok and on_green.name == "smoke items (green)"
    assert on_blue.name == "smoke items (blue)"
    assert not on_blue.ok and "got 500" in on_blue.detail
    assert "UndefinedColumn" in on_blue.detail and "SELECT name FROM items" in on_blue.detail


CHECKOUT = """
[[checks.flow]]
name = "checkout"

[[checks.flow.steps]]
name = "sign in"
method = "POST"
path = "/login"
json = { user = "smoke-user" }
capture = { user = "user", app_version = "version" }

[[checks.flow.steps]]
name = "add to cart"
method = "POST"
path = "/cart"
json = { item = "book-for-{{user}}" }
expect.json = { user = "{{user}}" }

[[checks.flow.steps]]
name = "read cart back"
path = "/cart"
expect.json = { cart = ["book-for-{{user}}"], version = "{{app_version}}" }
"""


def test_flow_with_captures_and_cookie_jar_passes(start_app: Callable[..., str]) -> None:
    [r] = run(run_flows(checks(CHECKOUT), start_app(API_VERSION="v3"), target="proxy"))
    assert r.ok, r.detail
    assert r.name == "flow checkout (proxy)"
    assert r.detail.startswith("3 steps passed")
    assert r.data["captured"] == ["app_version", "user"] and len(r.data["steps"]) == 3


def test_flow_fails_naming_the_step(start_app: Callable[..., str]) -> None:
    broken = CHECKOUT.replace('["book-for-{{user}}"]', '["book-for-{{user}}", "pen"]')
    [r] = run(run_flows(checks(broken), start_app()))
    assert not r.ok
    assert r.detail.startswith("step 3/3 'read cart back' GET /cart: cart: no element matches \"pen\"")
    assert [s["status"] for s in r.data["steps"]] == [200, 200, 200]  # up to the failing step


def test_flow_without_cookie_fails_at_first_authenticated_step(start_app: Callable[..., str]) -> None:
    cfg = checks("""
[[checks.flow]]
name = "forgot to sign in"
[[checks.flow.steps]]
path = "/"
[[checks.flow.steps]]
name = "add to cart"
method = "POST"
path = "/cart"
json = { item = "book" }
""")
    [r] = run(run_flows(cfg, start_app()))
    assert not r.ok and "step 2/2 'add to cart'" in r.detail and "got 401" in r.detail
    assert "not signed in" in r.detail


def test_flow_capture_missing(start_app: Callable[..., str]) -> None:
    cfg = checks("""
[[checks.flow]]
name = "bad capture"
[[checks.flow.steps]]
method = "POST"
path = "/login"
capture = { token = "auth.token" }
""")
    [r] = run(run_flows(cfg, start_app()))
    assert not r.ok and "cannot capture token: no 'auth.token' in the JSON response" in r.detail


def test_verify_target_stops_on_wrong_version(start_app: Callable[..., str]) -> None:
    from changeover.checks import verify_target

    cfg = checks(SMOKE + CHECKOUT + "\n[checks.version]\nfield = 'version'\n")
    good = start_app(API_VERSION="v9")
    res = run(verify_target(cfg, good, health_path="/health", expected_version="v9", target="green"))
    assert [r.name for r in res] == ["version (green)", "smoke home (green)", "smoke echo json (green)",
                                     "smoke anonymous cart (green)", "flow checkout (green)"]
    assert all(r.ok for r in res), [r.detail for r in res if not r.ok]
    wrong = start_app(API_VERSION="v9", FAULT_VERSION="v8")
    [r] = run(verify_target(cfg, wrong, health_path="/health", expected_version="v9"))
    assert r.name == "version" and not r.ok
    # compatibility on blue: smoke only, no version expectation
    res = run(verify_target(cfg, wrong, health_path="/health", flows=False, target="blue"))
    assert [r.name for r in res] == ["smoke home (blue)", "smoke echo json (blue)", "smoke anonymous cart (blue)"]
