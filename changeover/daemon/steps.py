"""Recording a deployment's steps: written before each step acts, finished after, shown live; and
unwound, newest first, when the deployment fails or is aborted.

`StepRunner.run(kind, name, fn, undo=...)` is the only way the pipeline does anything that changes
the world, so every action has a row in `steps` (state=running, with its kind) before it starts,
and the CLI sees the same step with its duration as an event. A step that changes something names
its undo up front (alembic's operations know their reverse): it is registered before the step
acts, so a step that fails half-way (a slot half-started) is undone too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from changeover.daemon.model import StepKind
from changeover.errors import ChangeoverError
from changeover.redact import redact_text
from changeover.rpc import Emit
from changeover.state import State

T = TypeVar("T")
log = logging.getLogger("changeover.deploy")


def _test_delays() -> dict[str, float]:
    """CHANGEOVER_TEST_STEP_DELAY="switch:1.5,switch_back:1": hold a step that long after it acted and
    before it is recorded done, so the fault-path tests can kill the daemon exactly there."""
    out: dict[str, float] = {}
    for part in os.environ.get("CHANGEOVER_TEST_STEP_DELAY", "").split(","):
        kind, _, secs = part.partition(":")
        if kind and secs:
            out[kind.strip()] = float(secs)
    return out


DELAYS = _test_delays()


async def _drop(event: dict[str, Any]) -> None:
    return None


class StepFailed(ChangeoverError):
    """A step failed; `step` names it and the message is the cause."""

    def __init__(self, step: str, cause: str, kind: StepKind = StepKind.NOTE) -> None:
        self.step = step
        self.cause = cause
        self.kind = kind
        super().__init__(f"{step}: {cause}")


@dataclass(frozen=True)
class Undo:
    """The reverse of a step: run as a step of its own when the deployment unwinds."""

    kind: StepKind
    name: str
    fn: Callable[[], Awaitable[Any]]


class StepRunner:
    def __init__(self, state: State, deployment_id: int, emit: Emit | None = None) -> None:
        self.state = state
        self.deployment_id = deployment_id
        self.emit: Emit = emit or _drop
        self.current: str | None = None
        self.current_kind: StepKind = StepKind.NOTE
        self.undos: list[Undo] = []
        # The daemon stops mid-deployment (SIGTERM, down): no further step begins, even should the
        # cancel of the deployment have been dropped (daemon/cancel.py); the next daemon settles it.
        self.halted = False

    async def run(self, kind: StepKind, name: str, fn: Callable[[], Awaitable[T]], *,
                  detail: Callable[[T], str | None] | None = None, undo: Undo | None = None) -> T:
        if self.halted:
            raise asyncio.CancelledError(f"the daemon is stopping: step {name} not begun")
        step_id = self.state.begin_step(self.deployment_id, name, kind)
        self.current, self.current_kind = name, kind
        if undo is not None:
            self.undos.append(undo)
        await self.emit({"type": "step", "name": name, "kind": str(kind), "state": "running"})
        t0 = time.monotonic()
        try:
            result = await fn()
            if DELAYS.get(str(kind)):
                await asyncio.sleep(DELAYS[str(kind)])
        except ChangeoverError as e:
            msg = redact_text(str(e))
            self.state.end_step(step_id, "failed", msg)
            await self.emit({"type": "step", "name": name, "kind": str(kind), "state": "failed",
                             "duration": time.monotonic() - t0, "detail": msg})
            log.warning("step %s failed: %s", name, msg)
            raise StepFailed(name, msg, kind) from e
        except asyncio.CancelledError:
            self.state.end_step(step_id, "failed", "interrupted")
            raise
        except BaseException as e:
            # A bug: the row must not stay "running" while this daemon lives.
            self.state.end_step(step_id, "failed", f"{type(e).__name__}: {e}")
            raise
        text = detail(result) if detail else None
        self.state.end_step(step_id, "ok", text)
        elapsed = time.monotonic() - t0
        await self.emit({"type": "step", "name": name, "kind": str(kind), "state": "ok", "duration": elapsed,
                         "detail": text})
        log.info("step %s ok in %.3fs%s", name, elapsed, f" ({text})" if text else "")
        return result

    async def note(self, name: str, detail: str) -> None:
        """A step that was considered and did not need to act (e.g. no migrations configured)."""
        step_id = self.state.begin_step(self.deployment_id, name, StepKind.NOTE, detail)
        self.state.end_step(step_id, "skipped")
        await self.emit({"type": "step", "name": name, "kind": str(StepKind.NOTE), "state": "skipped",
                         "duration": 0.0, "detail": detail})

    def forget(self, kind: StepKind) -> None:
        """A step's undo no longer applies (e.g. the switch was undone on purpose already)."""
        self.undos = [u for u in self.undos if u.kind != kind]

    async def unwind(self) -> list[str]:
        """Undo what ran, newest first. A failing undo is reported and the rest still run."""
        problems = []
        while self.undos:
            u = self.undos.pop()
            try:
                await self.run(u.kind, u.name, u.fn)
            except StepFailed as e:
                log.error("undo %s failed: %s", u.name, e.cause)
                problems.append(f"{u.name}: {e.cause}")
        return problems
