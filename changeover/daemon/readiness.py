"""Is a freshly started instance ready? Its health path must answer 2xx several times in a row.

The answer when it is not says why in the user's terms ("target failed to become healthy" is the
most common deploy failure in our field): the status and body of the last check, or the
connection error, or how the process exited, with a hint for the usual causes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import httpx

from changeover.config import AppConfig
from changeover.daemon.procs import Proc

HEALTH_TIMEOUT = 5.0   # per health request (kamal-proxy's default too)
EXIT_POLL = 0.05       # how often the process is looked at between checks


async def wait_ready(proc: Proc, port: int, index: int, app: AppConfig) -> str | None:
    """None once GET health_path answered 2xx app.healthy_threshold times in a row (checks every
    app.health_interval) within app.ready_timeout; otherwise why not. Returns at once if the
    process exits."""
    url = f"http://127.0.0.1:{port}{app.health_path}"
    started = time.monotonic()
    deadline = started + app.ready_timeout
    streak, last_error = 0, "no health check completed"
    # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback checks.
    # verify=False: checks are plain HTTP, and building a TLS context costs ~15 ms per client.
    async with httpx.AsyncClient(trust_env=False, verify=False, follow_redirects=False) as client:
        while True:
            if proc.poll():
                # Exit 0 before ready: a wrapper that backgrounds the server, or a daemonizing one.
                hint = (" (the command must stay in the foreground: use exec in wrapper scripts, "
                        "no daemon mode)") if proc.returncode == 0 else ""
                return (f"instance {index} {proc.describe_exit()}{hint} "
                        f"{time.monotonic() - started:.1f}s after start, before becoming ready "
                        f"(last health check: {last_error})")
            now = time.monotonic()
            if now >= deadline:
                return (f"instance {index} (port {port}) was not ready within "
                        f"{app.ready_timeout:g}s ({app.healthy_threshold} consecutive 2xx needed "
                        f"from GET {app.health_path}); last health check: {last_error}")
            try:
                r = await _unless_exited(proc, client.get(
                    url, timeout=max(0.1, min(HEALTH_TIMEOUT, deadline - now))))
                if r is None:
                    continue  # exited meanwhile: reported at the top of the loop
                if 200 <= r.status_code < 300:
                    streak += 1
                    if streak >= app.healthy_threshold:
                        return None
                else:
                    streak = 0
                    last_error = status_error(r, app.health_path)
            except httpx.HTTPError as e:
                streak = 0
                last_error = http_error(e)
            # Sleep the interval in short steps, so an early exit is noticed at once.
            until = min(time.monotonic() + app.health_interval, deadline)
            while (left := until - time.monotonic()) > 0 and not proc.poll():
                await asyncio.sleep(min(left, EXIT_POLL))


async def _unless_exited(proc: Proc, request: Coroutine[Any, Any, httpx.Response]) -> httpx.Response | None:
    """The response, or None if the process exited first (a hung check must not hide an exit)."""
    task = asyncio.ensure_future(request)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=EXIT_POLL)
            if done:
                return task.result()
            if proc.poll():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def status_error(r: httpx.Response, health_path: str) -> str:
    body = " ".join(r.text[:200].split())
    msg = f"HTTP {r.status_code} {r.reason_phrase}" + (f": {body}" if body else "")
    # Hints for the usual reasons of "target failed to become healthy".
    if 300 <= r.status_code < 400:
        msg += (f" (redirects to {r.headers.get('location', '?')}: the health check needs a 2xx "
                "answer over plain HTTP; exempt the path from HTTPS/login redirects)")
    elif r.status_code in (400, 403, 421):
        msg += " (a Host header check? health checks are sent with Host: 127.0.0.1:$PORT)"
    elif r.status_code == 404:
        msg += f" (is health_path {health_path!r} right?)"
    return msg


def http_error(e: httpx.HTTPError) -> str:
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({str(e) or 'refused'}): is the app listening on 127.0.0.1:$PORT?"
    if isinstance(e, httpx.TimeoutException):
        return f"timed out ({type(e).__name__})"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
