"""The dashboard's security, against the real daemon of conftest.site: no session, no action;
a cross-origin request or one without the CSRF token is refused; nothing changes on GET or on
a refusal; no secret value reaches a page, a stream or an API answer."""

from __future__ import annotations

import os
import stat
from typing import Any

import httpx
import pytest

from changeover.dashboard import auth
from tests.dashboard.conftest import Site

PAGES = ("/", "/traffic", "/history", "/migrations")
READS = ("/api/state", "/api/traffic", "/api/plan/rollback", "/events?page=now")
ACTIONS = ("rollback", "promote", "stop_standby", "redeploy")


def snapshot(site: Site) -> tuple[Any, ...]:
    st = site.project.status()
    hist = site.history()
    return ((st["live"] or {}).get("version"), (st["live"] or {}).get("slot"), (st["standby"] or {}).get("version"),
            [(h["id"], h["state"]) for h in hist])


def logged_in(site: Site) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=site.base, timeout=30)
    r = c.post("/login", data={"token": site.token()})
    assert r.status_code == 303, r.text
    page = c.get("/")
    csrf = page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    return c, csrf


def test_without_a_session_everything_is_401_and_nothing_changes(site: Site) -> None:
    before = snapshot(site)
    with httpx.Client(base_url=site.base, timeout=30) as c:
        for path in (*PAGES, *READS):
            r = c.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert "v1" not in r.text and "blue" not in r.text, path   # nothing of the daemon's state leaks
        for action in ACTIONS:
            r = c.post(f"/actions/{action}", json={"expect": "", "reason": "x"}, headers={"x-csrf-token": "x"})
            assert r.status_code == 401, (action, r.status_code)
        assert c.post("/logout").status_code == 401
    with httpx.Client(base_url=site.base, timeout=30, cookies={auth.COOKIE: "1.abc.0000"}) as forged:
        r = forged.post("/actions/rollback", json={"reason": "x"}, headers={"x-csrf-token": "0000"})
        assert r.status_code == 401
    assert snapshot(site) == before


def test_cross_origin_and_csrf_less_posts_are_refused(site: Site) -> None:
    c, csrf = logged_in(site)
    before = snapshot(site)
    runs = len(c.get("/api/state").json()["runs"])
    plan = c.get("/api/plan/stop_standby").json()
    body = {"expect": plan["expect"], "reason": "attack"}
    evil = {"origin": "http://evil.example"}
    cases = [
        ({**evil}, "no CSRF token, another origin"),
        ({}, "no CSRF token"),
        ({auth.CSRF_HEADER: "0" * 64}, "a wrong CSRF token"),
        ({auth.CSRF_HEADER: csrf, **evil}, "the right token from another origin"),
        ({auth.CSRF_HEADER: csrf, "sec-fetch-site": "cross-site"}, "the right token, cross-site"),
    ]
    for headers, what in cases:
        for action in ("stop_standby", "rollback"):
            r = c.post(f"/actions/{action}", json=body, headers=headers)
            assert r.status_code == 403, (what, action, r.status_code, r.text)
    # Another session's CSRF token is no good either.
    other, other_csrf = logged_in(site)
    assert c.post("/actions/rollback", json=body, headers={auth.CSRF_HEADER: other_csrf}).status_code == 403
    # The right token, but a confirmation of another situation: refused, nothing done.
    r = c.post("/actions/rollback", json={"expect": "blue:v0:None:None:None:None", "reason": "stale"},
               headers={auth.CSRF_HEADER: csrf})
    assert r.status_code == 409, r.text
    # Nothing mutates on GET.
    for path in ("/actions/rollback", "/actions/stop_standby", "/logout"):
        assert c.get(path).status_code == 405
    assert snapshot(site) == before
    assert len(c.get("/api/state").json()["runs"]) == runs   # no action was even started
    c.close()
    other.close()


def test_login_token_and_cookie(site: Site) -> None:
    path = auth.token_path(site.project.root / ".changeover")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with httpx.Client(base_url=site.base, timeout=30) as c:
        token = site.token()
        for wrong in ("", "x", token[:-1], token + "x", token.upper()):
            r = c.post("/login", data={"token": wrong})
            assert r.status_code == 401 and auth.COOKIE not in r.headers.get("set-cookie", ""), wrong
        cross = c.post("/login", data={"token": token}, headers={"origin": "http://evil.example"})
        assert cross.status_code == 403 and "set-cookie" not in cross.headers
        r = c.post("/login", data={"token": token})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert c.get("/").status_code == 200
        h = c.get("/").headers
        assert "frame-ancestors 'none'" in h["content-security-policy"] and h["x-frame-options"] == "DENY"


def _stream_once(c: httpx.Client, page: str) -> str:
    text = ""
    with c.stream("GET", f"/events?page={page}") as s:
        for line in s.iter_lines():
            text += line + "\n"
            if line.startswith("event: actions"):
                break
    return text


@pytest.mark.parametrize("page", ["now", "traffic", "history", "migrations"])
def test_no_secret_on_any_page_stream_or_answer(site: Site, page: str) -> None:
    c, _ = logged_in(site)
    token = site.token()
    path = "/" if page == "now" else f"/{page}"
    seen = {path: c.get(path).text, f"events {page}": _stream_once(c, page),
            "state": c.get("/api/state").text, "traffic": c.get("/api/traffic").text,
            "login": httpx.get(site.base + "/login").text}
    for action in ACTIONS:
        seen[f"plan {action}"] = c.get(f"/api/plan/{action}", params={"version": "v1"}).text
    if page == "migrations":
        assert "postgres:***@127.0.0.1" in seen[path]   # the database is named, its password masked
    for name, text in seen.items():
        assert text, name
        for secret in (*site.secrets, token):
            assert secret not in text, (name, secret)
    c.close()
