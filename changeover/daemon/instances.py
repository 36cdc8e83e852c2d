"""What the supervisor knows of a slot's instances: the release a slot runs, one instance's record
(persisted, so a restarted daemon adopts it), the events it reports, and its live bookkeeping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover.daemon import procs


@dataclass(frozen=True)
class ReleaseSpec:
    """What a slot runs."""

    version: str
    path: Path                     # working directory of the app
    command: tuple[str, ...]       # argv, never a shell; "$PORT" and "${PORT}" substituted per instance
    env: dict[str, str]            # the release env, over the daemon's own; PORT is added per instance


@dataclass(frozen=True)
class InstanceRecord:
    """One running instance, persisted by the daemon so a restarted daemon can adopt it."""

    index: int
    pid: int
    port: int
    proc_start: int                # /proc/<pid>/stat field 22: a recycled pid never matches
    log_path: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "port": self.port,
                "proc_start": self.proc_start, "log_path": self.log_path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        try:
            rec = cls(index=int(data["index"]), pid=int(data["pid"]), port=int(data["port"]),
                      proc_start=int(data["proc_start"]), log_path=str(data["log_path"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid instance record {data!r}: {e}") from None
        if rec.pid <= 1 or not 0 < rec.port < 65536 or rec.index < 0:
            raise ValueError(f"invalid instance record {data!r}")
        return rec


@dataclass(frozen=True)
class SupervisorEvent:
    slot: str
    kind: str  # started | ready | crashed | restarting | restarted | gave_up | stopped | adopted | lost
    instance: InstanceRecord | None
    detail: str


@dataclass(eq=False)
class Instance:
    index: int
    port: int
    log_path: Path
    proc: procs.Proc | None = None
    ready: bool = False
    gave_up: bool = False
    crashes: int = 0             # consecutive, reset after STABLE_AFTER of running
    total_crashes: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def record(self) -> InstanceRecord | None:
        if self.proc is None or self.proc.exited:
            return None
        return InstanceRecord(self.index, self.proc.pid, self.port, self.proc.start, str(self.log_path))


@dataclass
class SlotProcesses:
    release: ReleaseSpec
    instances: list[Instance]
