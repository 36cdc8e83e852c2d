"""Stopping tasks for sure, within a bound.

A single `task.cancel()` is not a guarantee on Python 3.11: `asyncio.wait_for` returns its inner
call's result instead of raising when the cancellation lands in the instant that call finishes
(CPython gh-86296, fixed in 3.12), so a loop that awaits anything through `wait_for` (a library's
or ours) can swallow the one cancel and run on; awaiting it then never returns. The daemon's stop
(SIGTERM, `changeover down`) therefore cancels again until the task is done, and gives up naming
what is stuck after a bound instead of hanging, so the process always exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("changeover.daemon")
RETRY = 0.2   # seconds between cancels of a task that is still running


def where(task: asyncio.Task[Any]) -> str:
    """The task's name and the line it waits at, for a log line about a stuck stop."""
    frames = task.get_stack(limit=1)
    at = f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else "?"
    return f"{task.get_name()} at {at}"


async def stop(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> list[asyncio.Task[Any]]:
    """Cancel `tasks` and wait for them, cancelling again every RETRY seconds those that are still
    running (a dropped cancel), for at most `timeout` seconds. A task's own failure is logged.
    Returns the tasks still running then (logged as an error)."""
    loop = asyncio.get_running_loop()
    tasks = list(tasks)
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(RETRY, left))
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("task %s failed", t.get_name(), exc_info=t.exception())
    if pending:
        log.error("stopping: %d task(s) still running after %gs of cancelling: %s", len(pending), timeout,
                  ", ".join(where(t) for t in pending))
    return sorted(pending, key=lambda t: t.get_name())


async def leftovers(timeout: float) -> list[asyncio.Task[Any]]:
    """Stop every task of the loop but the caller's (the loop's own final cancel is one cancel and
    an unbounded wait). Returns those that would not stop."""
    me = asyncio.current_task()
    return await stop((t for t in asyncio.all_tasks() if t is not me), timeout)
