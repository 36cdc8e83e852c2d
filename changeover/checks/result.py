"""One structured result per check, and the runner that gives every check its timeout.

A check is an async function returning an `Outcome` (or raising `Failed`); `run_check` times it,
bounds it with its own timeout and turns any exception into a failed result, so one broken
dependency can never crash the deploy pipeline or print a traceback. Details and data are redacted
here, at the single place results are made, so secrets cannot leak through any check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from changeover.redact import redact_obj, redact_text

GRACE = 1.0       # seconds added to the hard limit of checks that enforce their own inner timeout
MAX_DETAIL = 500  # characters; response bodies and command output are cut to keep results readable


@dataclass(frozen=True)
class CheckResult:
    """name: what was checked ("database", "smoke home page"); kind: the family ("database",
    "redis", "endpoint", "service", "integrity", "budget", "version", "smoke", "flow", "session");
    skipped: nothing was checked (e.g. no live version yet) and that is not a failure."""

    name: str
    kind: str
    ok: bool
    duration: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", redact_text(self.detail))
        object.__setattr__(self, "data", redact_obj(self.data))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "ok": self.ok,
                               "duration": round(self.duration, 4), "detail": self.detail}
        if self.skipped:
            out["skipped"] = True
        if self.data:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CheckResult:
        """For results stored with a deployment and read back (`history --checks`)."""
        return cls(name=str(obj["name"]), kind=str(obj["kind"]), ok=bool(obj["ok"]),
                   duration=float(obj.get("duration", 0.0)), detail=str(obj.get("detail", "")),
                   data=dict(obj.get("data") or {}), skipped=bool(obj.get("skipped", False)))


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


class Failed(Exception):
    """Raised inside a check to fail it with a message (and optional data)."""

    def __init__(self, detail: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.data = data or {}


def passed(detail: str, **data: Any) -> Outcome:
    return Outcome(True, detail, data)


def skipped(detail: str) -> Outcome:
    return Outcome(True, f"skipped: {detail}", {}, skipped=True)


def shorten(text: str, limit: int = MAX_DETAIL) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(e: BaseException) -> str:
    """A one-line message for a foreign exception: type and text, no traceback."""
    msg = str(e).strip() or repr(e)
    return shorten(f"{type(e).__name__}: {msg}")


async def run_check(name: str, kind: str, timeout: float,
                    check: Callable[[], Awaitable[Outcome]]) -> CheckResult:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            out = await check()
    except TimeoutError:
        out = Outcome(False, f"timed out after {timeout:g}s")
    except Failed as e:
        out = Outcome(False, e.detail, e.data)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a check must report, never crash the pipeline
        out = Outcome(False, describe_error(e))
    return CheckResult(name=name, kind=kind, ok=out.ok, duration=time.perf_counter() - start,
                       detail=shorten(out.detail, 2 * MAX_DETAIL), data=out.data, skipped=out.skipped)


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.ok]


def summary(results: list[CheckResult]) -> str:
    """'3 checks passed' / '2 of 7 checks failed: database, smoke home page'."""
    bad = failures(results)
    n = len(results)
    if not bad:
        return f"{n} check{'s' if n != 1 else ''} passed"
    return f"{len(bad)} of {n} checks failed: " + ", ".join(r.name for r in bad)
