"""Deploy notifications: fire-and-forget webhook POSTs, retried with exponential backoff.

`notify()` only schedules a task and returns, so a slow or dead receiver can never delay a
rollback; failures are logged (with the URL reduced to scheme and host: Slack-style webhook URLs
carry their secret in the path) and never raised. `close()` gives pending deliveries a bounded
time to finish when the daemon stops.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import httpx

from changeover.monitor.config import EVENTS, NotifyConfig, Webhook

log = logging.getLogger("changeover.notify")

DEFAULT_CLOSE_TIMEOUT = 5.0
MAX_BACKOFF = 60.0

_TITLES = {
    "deploy_started": "deploy started",
    "failed": "deploy FAILED (the old release stays live)",
    "live": "is live",
    "finalised": "finalised",
    "rolled_back": "ROLLED BACK",
    "rollback_refused": "automatic rollback REFUSED",
    "certificate_issued": "TLS certificate issued",
    "certificate_failed": "TLS certificate FAILED (the last good one is still served)",
}


def safe_url(url: str) -> str:
    """scheme://host[:port] only: enough to tell receivers apart, no tokens in logs."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname or ''}{f':{p.port}' if p.port else ''}"


def slack_text(event: str, payload: dict[str, Any]) -> str:
    """One readable line (plus the reason) for chat receivers."""
    app = payload.get("app") or "changeover"
    version = payload.get("version") or ""
    head = f"*{app}*: {version} {_TITLES.get(event, event)}".replace("  ", " ")
    previous = payload.get("previous")
    if previous and event in ("rolled_back", "rollback_refused"):
        head += f" (traffic on {previous})" if event == "rolled_back" else f" (still on {version})"
    lines = [head]
    for key in ("reason", "message"):
        if payload.get(key):
            lines.append(f"{key}: {payload[key]}")
    return "\n".join(lines)


def body_for(hook: Webhook, event: str, payload: dict[str, Any], at: str) -> dict[str, Any]:
    if hook.format == "slack":
        return {"text": slack_text(event, payload)}
    return {"event": event, "time": at, **payload}


class Notifier:
    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        self._tasks: set[asyncio.Task[bool]] = set()
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0   # counters for `changeover status` and tests
        self.failed = 0

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        """Schedule delivery of `event` to every webhook subscribed to it; returns at once."""
        if event not in EVENTS:
            log.error("unknown notification event %r (known: %s)", event, ", ".join(EVENTS))
            return
        hooks = [h for h in self.cfg.webhooks if event in h.events]
        if not hooks:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.error("notification %s dropped: no running event loop", event)
            return
        at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for hook in hooks:
            try:
                # Serialise now: the caller may mutate payload after we return.
                content = json.dumps(body_for(hook, event, payload, at), default=str).encode()
            except (TypeError, ValueError) as e:
                log.error("notification %s to %s dropped: payload is not JSON: %s",
                          event, safe_url(hook.url), e)
                continue
            t = loop.create_task(self._deliver(hook, event, content))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.cfg.timeout, follow_redirects=False)
        return self._client

    async def _deliver(self, hook: Webhook, event: str, content: bytes) -> bool:
        headers = {"content-type": "application/json", "user-agent": "changeover",
                   **dict(hook.headers)}
        delay = self.cfg.backoff
        attempts = self.cfg.retries + 1
        problem = ""
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                r = await self._http().post(hook.url, content=content, headers=headers)
                if r.status_code < 300:
                    self.delivered += 1
                    return True
                problem = f"HTTP {r.status_code}"
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    break  # the receiver rejects this payload: retrying won't help
            except Exception as e:  # any failure (bad URL, TLS, reset) is a failed attempt
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < attempts:
                log.info("notification %s to %s failed (%s), retry %d/%d in %.1fs", event,
                         safe_url(hook.url), problem, attempt, attempts - 1, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        self.failed += 1
        log.warning("notification %s to %s failed after %d attempt(s): %s", event,
                    safe_url(hook.url), attempt, problem)
        return False

    async def flush(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """Wait up to `timeout` for pending deliveries; True when none is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return not self._tasks

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Give pending deliveries up to `timeout`, cancel the rest, release the HTTP client."""
        if not await self.flush(timeout):
            left = list(self._tasks)
            log.warning("%d notification(s) abandoned at shutdown", len(left))
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
