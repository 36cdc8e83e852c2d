"""User flows (ordered steps sharing a cookie jar and captured values) and session continuity.

A flow is one check: it stops at the first failing step and names it, because later steps
depend on the earlier ones (no cart without a sign-in). The session probe signs in through the
proxy while blue is live and keeps that cookie jar in memory; after the switch the same jar must
still be signed in, i.e. sessions live in a shared store and survive the deploy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from changeover.checks.config import ChecksConfig, Flow, Request, SessionCheck
from changeover.checks.http import client, labelled, perform
from changeover.checks.result import CheckResult, Failed, Outcome, passed, run_check


async def _steps(http: httpx.AsyncClient, flow: Flow, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the steps in order; raise Failed naming the first failing step."""
    done: list[dict[str, Any]] = []
    n = len(flow.steps)
    for i, step in enumerate(flow.steps, 1):
        try:
            ex = await perform(http, step, values)
        except Failed as e:
            raise Failed(f"step {i}/{n} {step.name!r}: {e.detail}", {"steps": done}) from None
        done.append(ex.data())
        if ex.problems:
            raise Failed(f"step {i}/{n} {step.name!r} {ex.method} {ex.path}: " + "; ".join(ex.problems),
                         {"steps": done})
    return done


async def run_flow(flow: Flow, base_url: str, target: str | None = None) -> CheckResult:
    async def check() -> Outcome:
        values: dict[str, Any] = {}
        async with client(base_url, flow.timeout) as http:
            steps = await _steps(http, flow, values)
        total = sum(s["latency_ms"] for s in steps)
        return passed(f"{len(steps)} steps passed in {total:.0f} ms", steps=steps, captured=sorted(values))

    return await run_check(labelled(f"flow {flow.name}", target), "flow", flow.timeout, check)


async def run_flows(cfg: ChecksConfig, base_url: str, *, target: str | None = None) -> list[CheckResult]:
    """Every [[checks.flow]] against base_url, each with its own cookie jar, concurrently.
    target labels the results, as for run_smoke."""
    return list(await asyncio.gather(*(run_flow(f, base_url, target) for f in cfg.flows)))


class SessionProbe:
    """Session continuity across the switch.

        probe = SessionProbe(cfg)             # cfg.session must be set
        await probe.sign_in(proxy_url)        # while blue is live
        ... switch ...
        await probe.verify(proxy_url)         # green must still know the session

    sign_in also runs the verify request once on blue, so a probe that cannot prove a session
    even before the switch fails early instead of blaming the deploy later.
    """

    def __init__(self, cfg: ChecksConfig) -> None:
        if cfg.session is None:
            raise ValueError("SessionProbe needs [checks.session] in the config")
        self.session: SessionCheck = cfg.session
        self.cookies = httpx.Cookies()
        self.values: dict[str, Any] = {}
        self.signed_in = False

    async def _verify_once(self, http: httpx.AsyncClient, req: Request) -> dict[str, Any]:
        ex = await perform(http, req, dict(self.values))
        if ex.problems:
            raise Failed(f"{ex.method} {ex.path}: " + "; ".join(ex.problems), ex.data())
        return ex.data()

    async def sign_in(self, proxy_url: str) -> CheckResult:
        s = self.session

        async def check() -> Outcome:
            self.cookies, self.values, self.signed_in = httpx.Cookies(), {}, False
            async with client(proxy_url, s.timeout) as http:
                steps = await _steps(http, s.flow, self.values)
                try:
                    proof = await self._verify_once(http, s.verify)
                except Failed as e:
                    raise Failed(f"signed in, but the session is not recognised even before the switch: "
                                 f"{e.detail}", e.data) from None
                self.cookies = httpx.Cookies(http.cookies)
            self.signed_in = True
            # No cookie is fine when the session is a captured token sent in a header.
            carried = "cookie jar" if self.cookies else "captured values only (no cookie set)"
            return passed(f"signed in with flow {s.flow.name!r} ({len(steps)} steps); "
                          f"{s.verify.method} {s.verify.path} -> {proof['status']}; carrying {carried}",
                          steps=steps, cookies=sorted(c.name for c in self.cookies.jar))

        return await run_check("session sign-in", "session", s.timeout, check)

    async def verify(self, proxy_url: str) -> CheckResult:
        s = self.session

        async def check() -> Outcome:
            if not self.signed_in:
                raise Failed("no signed-in session to verify (sign_in did not pass)")
            async with client(proxy_url, s.timeout, cookies=self.cookies) as http:
                try:
                    proof = await self._verify_once(http, s.verify)
                except Failed as e:
                    raise Failed(f"session lost across the switch: {e.detail}", e.data) from None
            return passed(f"session kept: {s.verify.method} {s.verify.path} -> {proof['status']}", **proof)

        return await run_check("session verify", "session", s.timeout, check)
