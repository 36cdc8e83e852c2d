"""Fixtures for the supervisor tests: real app processes on real ports, all killed afterwards."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from changeover.config import AppConfig
from changeover.daemon import procs
from changeover.daemon.instances import ReleaseSpec, SupervisorEvent
from changeover.daemon.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_APP = ROOT / "examples" / "app" / "server.py"

# Fast but generous: no test depends on these being tight.
FAST = {"health_interval": 0.05, "healthy_threshold": 2, "ready_timeout": 15.0, "stop_timeout": 5.0}


@dataclass
class Harness:
    tmp: Path
    events: list[SupervisorEvent] = field(default_factory=list)
    started: set[tuple[int, int]] = field(default_factory=set)   # (pid, proc_start) of every process

    def on_event(self, ev: SupervisorEvent) -> None:
        self.events.append(ev)
        if ev.instance is not None:
            self.started.add((ev.instance.pid, ev.instance.proc_start))

    def supervisor(self, command: tuple[str, ...] | None = None, **app: Any) -> Supervisor:
        cfg = AppConfig(command=command or (sys.executable, str(EXAMPLE_APP)), **{**FAST, **app})
        return Supervisor(cfg, self.tmp / "logs", on_event=self.on_event)

    def release(self, version: str = "v1", env: dict[str, str] | None = None,
                command: tuple[str, ...] | None = None, path: Path | None = None) -> ReleaseSpec:
        return ReleaseSpec(version=version, path=path or ROOT / "examples" / "app",
                           command=command or (sys.executable, str(EXAMPLE_APP), "$PORT"),
                           env={"API_VERSION": version, **(env or {})})

    def kinds(self, slot: str | None = None) -> list[str]:
        return [e.kind for e in self.events if slot is None or e.slot == slot]

    def script(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        p.chmod(0o755)
        return p


def _stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields from the state on) of every process."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            yield int(name), stat[stat.rfind(")") + 2:].split()


def group_gone(pgid: int) -> bool:
    """No live process left in the group (orphaned zombies wait for init, which may be slow)."""
    return not any(f[2] == str(pgid) and f[0] != "Z" for _, f in _stats())


def zombies(settle: float = 5.0) -> list[int]:
    """Our children that exited and were never reaped. Exits are reaped by asyncio's watcher
    threads, which a loaded machine can keep waiting a moment: a zombie must outlast `settle`."""
    deadline = time.monotonic() + settle
    while True:
        found = [pid for pid, f in _stats() if f[0] == "Z" and int(f[1]) == os.getpid()]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    # Whatever a test left behind (it failed half-way): kill each group still ours, reap.
    for pid, start in harness.started:
        if procs.group_alive(procs.Proc(pid, start)):  # never a recycled pid's group
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0 if procs.proc_state(pid, start) is not None else os.WNOHANG)
        except ChildProcessError:
            pass

