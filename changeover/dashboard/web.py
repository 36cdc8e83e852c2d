"""The dashboard's HTTP side (Starlette): pages, their live event stream, and the actions.

Rules every route follows:
- a page, a stream or a read needs a valid session (else 401, and nothing is read);
- nothing changes on GET: actions, login and logout are POSTs;
- an action needs the session, the CSRF token (header `X-CSRF-Token`) and a same-origin
  request, and carries the fingerprint of the situation its confirmation described;
- what a page shows was masked by the client (client.py) before any template saw it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from changeover.dashboard import actions, auth, pages
from changeover.dashboard.feed import Feed

HERE = Path(__file__).parent
PAGES = ("now", "traffic", "history", "migrations")
STREAM_TIMEOUT = 15.0      # a comment line this often keeps idle proxies from closing the stream
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",   # "no-referrer" makes browsers send Origin: null
    "Cache-Control": "no-store",
}


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f} %"


class Web:
    def __init__(self, feed: Feed, keys: auth.Keys, pages_: pages.Pages, secure: bool) -> None:
        self.feed = feed
        self.keys = keys
        self.pages = pages_
        self.secure = secure
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        env.filters.update(when=_when, ago=_ago, ms=_ms, pct=_pct, tojson_pretty=lambda v: json.dumps(v, indent=1))
        self.env = env
        self.app = Starlette(routes=[
            Route("/", self.page_now), Route("/traffic", self.page_traffic), Route("/history", self.page_history),
            Route("/migrations", self.page_migrations),
            Route("/login", self.login_form, methods=["GET"]), Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/events", self.events), Route("/api/state", self.api_state), Route("/api/traffic", self.api_traffic),
            Route("/api/plan/{action}", self.api_plan), Route("/actions/{action}", self.act, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ])

    # -- plumbing ---------------------------------------------------------------------------------
    def render(self, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**ctx), status_code=status, headers=HEADERS)

    def session(self, request: Request) -> str | None:
        cookie = request.cookies.get(auth.COOKIE)
        return cookie if self.keys.valid_session(cookie) else None

    def refuse(self, request: Request, status: int, why: str) -> Response:
        if request.headers.get("accept", "").startswith("text/html") and request.method == "GET":
            return self.render("login.html", status, error=why)
        return JSONResponse({"error": why}, status_code=status, headers=HEADERS)

    def same_origin(self, request: Request) -> bool:
        """A browser says where a request comes from: another site's page may not act here."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True   # not sent by older browsers on same-origin requests; the CSRF token still is
        host = request.headers.get("host", "")
        o = urlsplit(origin)
        return o.netloc == host and o.scheme == ("https" if self.secure else "http")

    def context(self, session: str, page: str) -> dict[str, Any]:
        f = self.feed
        return {"page": page, "csrf": self.keys.csrf(session), "st": f.status, "history": f.history,
                "releases": f.releases, "error": f.error, "runs": [r.to_dict() for r in f.runner.runs],
                "limits": self.pages.limits(), "now": time.time()}

    async def page(self, request: Request, page: str, **extra: Any) -> Response:
        session = self.session(request)
        if session is None:
            return self.refuse(request, 401, "log in first: `changeover dashboard` prints the login URL")
        if not self.feed.status and self.feed.error is None:
            await self.feed.refresh(full=True)   # the first page after a start: read now, not in a second
        return self.render(f"{page}.html", **self.context(session, page), **extra)

    # -- pages ------------------------------------------------------------------------------------
    async def page_now(self, request: Request) -> Response:
        return await self.page(request, "now")

    async def page_traffic(self, request: Request) -> Response:
        return await self.page(request, "traffic")

    async def page_history(self, request: Request) -> Response:
        return await self.page(request, "history")

    async def page_migrations(self, request: Request) -> Response:
        if self.session(request) is None:
            return await self.page(request, "migrations")
        return await self.page(request, "migrations", migrations=await self.pages.migrations())

    # -- login ------------------------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        if self.session(request) is not None:
            return RedirectResponse("/", 303)
        return self.render("login.html", error=None)

    async def login(self, request: Request) -> Response:
        if not self.same_origin(request):
            return self.refuse(request, 403, "cross-origin login refused")
        form = await request.form()
        token = str(form.get("token") or "")
        if not self.keys.check_token(token):
            return self.render("login.html", 401, error="wrong token: `changeover dashboard` prints the right one")
        resp = RedirectResponse("/", 303, headers=HEADERS)
        resp.set_cookie(auth.COOKIE, self.keys.new_session(), max_age=int(auth.SESSION_TTL), httponly=True,
                        samesite="strict", secure=self.secure, path="/")
        return resp

    async def logout(self, request: Request) -> Response:
        bad = self.guard(request)
        if bad is not None:
            return bad
        resp = RedirectResponse("/login", 303, headers=HEADERS)
        resp.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure)
        return resp

    def guard(self, request: Request) -> Response | None:
        """The checks of every POST: session, same origin, CSRF token."""
        session = self.session(request)
        if session is None:
            return self.refuse(request, 401, "no session: log in first")
        if not self.same_origin(request):
            return self.refuse(request, 403, "cross-origin request refused")
        if not self.keys.valid_csrf(session, request.headers.get(auth.CSRF_HEADER)):
            return self.refuse(request, 403, "missing or wrong CSRF token: reload the page")
        return None

    # -- reads ------------------------------------------------------------------------------------
    async def api_state(self, request: Request) -> Response:
        if self.session(request) is None:
            return self.refuse(request, 401, "no session")
        f = self.feed
        return JSONResponse({"status": f.status, "history": f.history, "releases": f.releases, "error": f.error,
                             "runs": [r.to_dict() for r in f.runner.runs]}, headers=HEADERS)

    async def api_traffic(self, request: Request) -> Response:
        if self.session(request) is None:
            return self.refuse(request, 401, "no session")
        return JSONResponse(self.feed.traffic(), headers=HEADERS)

    async def api_plan(self, request: Request) -> Response:
        """What an action would do now: the confirmation's sentence (reads only)."""
        if self.session(request) is None:
            return self.refuse(request, 401, "no session")
        p = await self._plan(request.path_params["action"], request.query_params.get("version"))
        return JSONResponse({"action": p.action, "allowed": p.allowed, "text": p.text, "expect": p.expect,
                             "needs_reason": p.needs_reason, "version": p.version}, headers=HEADERS)

    async def _plan(self, action: str, version: str | None) -> actions.Plan:
        await self.feed.refresh(full=True)   # confirm against the situation as it is now
        f = self.feed
        if f.error is not None:
            return actions.Plan(action, False, f"the daemon does not answer: {f.error}", "")
        return actions.plan(action, f.status, f.history, f.releases, version)

    # -- actions ----------------------------------------------------------------------------------
    async def act(self, request: Request) -> Response:
        bad = self.guard(request)
        if bad is not None:
            return bad
        action = request.path_params["action"]
        if action not in actions.ACTIONS:
            return JSONResponse({"error": f"unknown action {action!r}"}, 404, headers=HEADERS)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return JSONResponse({"error": "expected a JSON object"}, 400, headers=HEADERS)
        version = body.get("version") if isinstance(body.get("version"), str) else None
        p = await self._plan(action, version)
        if not p.allowed:
            return JSONResponse({"error": p.text}, 409, headers=HEADERS)
        if body.get("expect") != p.expect:
            return JSONResponse({"error": "the situation changed since this was confirmed: nothing was done; "
                                          "look at the page again and confirm what it says now"}, 409, headers=HEADERS)
        reason = str(body.get("reason") or "").strip()[:500] or None
        if p.needs_reason and reason is None:
            return JSONResponse({"error": "say why (the reason is kept in the history)"}, 400, headers=HEADERS)
        run = self.feed.runner.start(p, actor=f"dashboard@{request.client.host if request.client else '?'}",
                                     reason=reason)
        return JSONResponse({"run": run.to_dict()}, 202, headers=HEADERS)

    # -- the live stream -----------------------------------------------------------------------------
    async def events(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return self.refuse(request, 401, "no session")
        page = request.query_params.get("page", "now")
        if page not in PAGES:
            return JSONResponse({"error": f"unknown page {page!r}"}, 404, headers=HEADERS)
        return StreamingResponse(self._stream(request, session, page), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    def fragments(self, session: str, page: str) -> dict[str, str]:
        ctx = self.context(session, page)
        out = {"header": self.env.get_template("_header.html").render(**ctx),
               "actions": self.env.get_template("_runs.html").render(**ctx)}
        if page in ("now", "history"):
            out["main"] = self.env.get_template(f"_{page}.html").render(**ctx)
        if page == "traffic":
            out["traffic"] = json.dumps(self.feed.traffic())
        return out

    async def _stream(self, request: Request, session: str, page: str) -> AsyncIterator[str]:
        f = self.feed
        f.watchers += 1
        sent: dict[str, str] = {}
        seen = -1
        try:
            yield "retry: 1000\n\n"
            while True:
                if not self.keys.valid_session(session):
                    yield "event: logout\ndata: {}\n\n"
                    return
                if seen >= 0:
                    seen = await f.wait(seen, STREAM_TIMEOUT)
                else:
                    seen = f.version
                if f.closing or await request.is_disconnected():
                    return
                parts = self.fragments(session, page)
                fresh = {k: v for k, v in parts.items() if sent.get(k) != v}
                if not fresh:
                    yield ": idle\n\n"
                    continue
                for name, data in fresh.items():
                    sent[name] = data
                    lines = "\n".join(f"data: {ln}" for ln in data.split("\n"))
                    yield f"event: {name}\n{lines}\n\n"
        finally:
            f.watchers -= 1
