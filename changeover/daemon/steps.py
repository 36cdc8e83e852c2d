"""Recording a deployment's steps: written before each step acts, finished after, shown live.

`StepRunner.run(name, fn)` is the only way the pipeline does anything that changes the world, so
every action has a row in `steps` (state=running) before it starts, and the CLI sees the same
step with its duration as an event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from changeover.errors import ChangeoverError
from changeover.redact import redact_text
from changeover.rpc import Emit
from changeover.state import State

T = TypeVar("T")
log = logging.getLogger("changeover.deploy")


async def _drop(event: dict[str, Any]) -> None:
    return None


class StepFailed(ChangeoverError):
    """A step failed; `step` names it and the message is the cause."""

    def __init__(self, step: str, cause: str) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"{step}: {cause}")


class StepRunner:
    def __init__(self, state: State, deployment_id: int, emit: Emit | None = None) -> None:
        self.state = state
        self.deployment_id = deployment_id
        self.emit: Emit = emit or _drop
        self.current: str | None = None

    async def run(self, name: str, fn: Callable[[], Awaitable[T]], *,
                  detail: Callable[[T], str | None] | None = None) -> T:
        step_id = self.state.begin_step(self.deployment_id, name)
        self.current = name
        await self.emit({"type": "step", "name": name, "state": "running"})
        t0 = time.monotonic()
        try:
            result = await fn()
        except ChangeoverError as e:
            msg = redact_text(str(e))
            self.state.end_step(step_id, "failed", msg)
            await self.emit({"type": "step", "name": name, "state": "failed",
                             "duration": time.monotonic() - t0, "detail": msg})
            log.warning("step %s failed: %s", name, msg)
            raise StepFailed(name, msg) from e
        except BaseException as e:
            # Cancelled or a bug: the row must not stay "running" while this daemon lives.
            self.state.end_step(step_id, "failed", f"{type(e).__name__}: {e}")
            raise
        text = detail(result) if detail else None
        self.state.end_step(step_id, "ok", text)
        elapsed = time.monotonic() - t0
        await self.emit({"type": "step", "name": name, "state": "ok", "duration": elapsed, "detail": text})
        log.info("step %s ok in %.3fs%s", name, elapsed, f" ({text})" if text else "")
        return result

    async def note(self, name: str, detail: str) -> None:
        """A step that was considered and did not need to act (e.g. no migrations configured)."""
        step_id = self.state.begin_step(self.deployment_id, name, detail)
        self.state.end_step(step_id, "skipped")
        await self.emit({"type": "step", "name": name, "state": "skipped", "duration": 0.0, "detail": detail})
