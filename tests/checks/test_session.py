"""Session continuity: sign in on "blue", verify on "green" (two real app processes).

Without REDIS_URL the example app keeps sessions in process memory, so a new process does not
know the cookie: the session is lost. With Redis both processes share the store: it is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis

from changeover.checks import SessionProbe
from changeover.checks.result import CheckResult
from tests.checks.helpers import checks

SESSION = """
[[checks.flow]]
name = "sign in"
[[checks.flow.steps]]
method = "POST"
path = "/login"
json = { user = "continuity-probe" }
capture = { user = "user" }

[checks.session]
flow = "sign in"
verify = { path = "/me", expect = { status = 200, json = { user = "{{user}}" } } }
"""


def one(coro: object) -> CheckResult:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _cleanup(probe: SessionProbe, url: str) -> None:
    sid = probe.cookies.get("sid")
    if sid:
        redis.Redis.from_url(url).delete(f"session:{sid}")


def test_session_lost_with_in_memory_sessions(start_app: Callable[..., str]) -> None:
    blue, green = start_app(API_VERSION="v1"), start_app(API_VERSION="v2")
    probe = SessionProbe(checks(SESSION))
    signed = one(probe.sign_in(blue))
    assert signed.ok, signed.detail
    assert signed.data["cookies"] == ["sid"] and "sid=" not in str(signed.to_json())
    kept_on_blue = one(probe.verify(blue))
    assert kept_on_blue.ok
    lost = one(probe.verify(green))
    assert not lost.ok and lost.kind == "session"
    assert lost.detail.startswith("session lost across the switch: GET /me: expected status 200, got 401")


def test_session_kept_with_redis(start_app: Callable[..., str], redis_url: str) -> None:
    blue = start_app(API_VERSION="v1", REDIS_URL=redis_url)
    green = start_app(API_VERSION="v2", REDIS_URL=redis_url)
    probe = SessionProbe(checks(SESSION))
    try:
        assert one(probe.sign_in(blue)).ok
        kept = one(probe.verify(green))
        assert kept.ok and kept.detail == "session kept: GET /me -> 200", kept.detail
    finally:
        _cleanup(probe, redis_url)


def test_verify_without_sign_in_and_unprovable_probe(start_app: Callable[..., str]) -> None:
    url = start_app()
    probe = SessionProbe(checks(SESSION))
    r = one(probe.verify(url))
    assert not r.ok and "sign_in did not pass" in r.detail
    # a verify request that fails even on blue is reported at sign-in, not blamed on the deploy
    bad = SessionProbe(checks(SESSION.replace('"/me"', '"/nowhere"')))
    r = one(bad.sign_in(url))
    assert not r.ok and "not recognised even before the switch" in r.detail and "got 404" in r.detail


def test_probe_needs_session_config() -> None:
    with pytest.raises(ValueError, match=r"\[checks.session\]"):
        SessionProbe(checks(""))
