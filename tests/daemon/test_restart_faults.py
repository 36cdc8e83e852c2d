"""The daemon killed inside every step that changes state, by SIGKILL and by SIGTERM (what
`systemctl restart` sends), under keep-alive load; then restarted.

After the restart: what the proxy serves is what `status` names, history says what really
happened, a deployment that had gone live is carried on (verification, the rest of its window),
a rollback that had begun is finished, and a fault switched on after the restart is still caught.
`CHANGEOVER_TEST_STEP_DELAY` holds a step after it acted and before it is recorded done, so the
kill lands exactly inside it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from changeover.loadgen import Load, get
from tests.daemon.harness import Project

MONITOR = """
[env]
FAULT_FILE = "{fault}"

[[checks.smoke]]
name = "home"
path = "/"

[monitor]
observe = "{observe}"
window = "2s"
consecutive_failures = 5
synthetic_rate = 5
metrics_listen = ""
"""


def setup(project: Project, observe: str = "60s") -> Path:
    fault = project.root / "fault.json"
    fault.write_text("{}")
    project.write(MONITOR.format(fault=fault, observe=observe))
    return fault


def wait_for_kind(project: Project, kind: str, deployment_kind: str = "deploy", timeout: float = 60) -> None:
    """Block until a step of `kind` is running in the newest deployment of `deployment_kind`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = project.running_step(deployment_kind)
        if step is not None and step.kind == kind:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {kind} step running within {timeout}s")


def background(project: Project, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "changeover", *args, "-c", str(project.config)],
                            cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def serving(project: Project) -> str | None:
    try:
        status, headers, _, rw = await get("127.0.0.1", project.port, "/", timeout=2)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return None
    if rw is not None:
        rw[1].close()
    return headers.get("x-version") if status == 200 else None


async def until_serving(project: Project, version: str, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await serving(project) == version:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{version} was not served within {timeout}s")


def history(project: Project) -> list[dict[str, Any]]:
    return list(json.loads(project.cli("history", "--json").stdout))


def restart(project: Project, monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    project.kill_daemon(sig)
    monkeypatch.delenv("CHANGEOVER_TEST_STEP_DELAY", raising=False)
    project.start_daemon()


# A step holds this long after it acted (CHANGEOVER_TEST_STEP_DELAY), so that a test starved of CPU
# on a loaded machine still kills the daemon inside it; the kill ends the hold, no test waits it out.
HOLD = 30

def hold(project: Project, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Restart the daemon with steps of `kind` held HOLD seconds (for the next deploy only)."""
    project.kill_daemon(signal.SIGTERM)
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", f"{kind}:{HOLD}")
    project.start_daemon()


SIGNALS = [pytest.param(signal.SIGKILL, id="SIGKILL"), pytest.param(signal.SIGTERM, id="SIGTERM")]


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("kind", ["pre_checks", "start", "verify_private"])
def test_killed_before_the_switch_nothing_users_see_changes(project: Project, monkeypatch: pytest.MonkeyPatch,
                                                             kind: str, sig: int) -> None:
    setup(project, observe="0s")
    project.start_daemon()
    project.cli("deploy", "v1", "--path", str(project.release("v1")))
    hold(project, monkeypatch, kind)

    async def scenario() -> Load:
        load = Load(project.port, connections=20)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        proc = background(project, "deploy", "v2", "--path", str(project.release("v2")), "--wait")
        await asyncio.to_thread(wait_for_kind, project, kind)
        await asyncio.to_thread(restart, project, monkeypatch, sig)
        proc.wait(timeout=60)
        assert await serving(project) == "v1"
        await asyncio.sleep(0.3)
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert load.failed == 0, load.errors[:5]
    assert set(load.versions) == {"v1"}
    st = project.status()
    assert st["live"]["version"] == "v1" and st["deploying"] is False
    h = history(project)[0]
    assert h["version"] == "v2" and h["state"] == "failed" and "interrupted" in h["reason"]
    # The daemon works after the restart: the same release deploys.
    project.cli("deploy", "v2", "--path", str(project.release("v2")), "--wait")
    assert project.status()["live"]["version"] == "v2"


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("kind", ["switch", "verify_public", "observe"])
def test_killed_after_the_switch_the_new_daemon_carries_on_and_still_rolls_back(
        project: Project, monkeypatch: pytest.MonkeyPatch, kind: str, sig: int) -> None:
    fault = setup(project)
    project.start_daemon()
    project.cli("deploy", "v1", "--path", str(project.release("v1")))
    if kind != "observe":
        hold(project, monkeypatch, kind)

    async def scenario() -> tuple[Load, float]:
        load = Load(project.port, connections=20)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        proc = background(project, "deploy", "v2", "--path", str(project.release("v2")), "--wait")
        await asyncio.to_thread(wait_for_kind, project, kind)
        if kind == "switch":
            # The step's row is written before it acts: kill only once the proxy has switched (the
            # step then holds, recorded as running; a kill before the act is the other test's case).
            await until_serving(project, "v2")
        if kind == "observe":
            await asyncio.sleep(1.0)   # well inside the window
        await asyncio.to_thread(restart, project, monkeypatch, sig)
        proc.wait(timeout=60)
        assert await serving(project) == "v2", "the new daemon must keep what the proxy serves"
        st = await asyncio.to_thread(project.status)
        assert st["live"]["version"] == "v2" and st["deploying"] is True
        await asyncio.sleep(1.0)
        fault.write_text(json.dumps({"error_rate": 1.0, "only_version": "v2"}))
        reaction = await until_serving(project, "v1", timeout=30)
        done.set()
        await runner
        return load, reaction

    load, _ = asyncio.run(scenario())
    assert set(load.versions) >= {"v1", "v2"}
    h = history(project)[0]
    assert h["version"] == "v2" and h["state"] == "rolled_back", h
    kinds = [s["kind"] for s in h["steps"]]
    assert "observe" in kinds and kinds[-1] in ("switch_back", "observe"), kinds
    st = project.status()
    assert st["live"]["version"] == "v1"


@pytest.mark.parametrize("sig", SIGNALS)
def test_killed_during_an_automatic_rollback_the_rollback_is_finished(
        project: Project, monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    fault = setup(project)
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "switch_back:5")
    project.start_daemon()
    project.cli("deploy", "v1", "--path", str(project.release("v1")))

    async def scenario() -> list[str | None]:
        proc = background(project, "deploy", "v2", "--path", str(project.release("v2")), "--wait")
        await until_serving(project, "v2")
        await asyncio.to_thread(wait_for_kind, project, "observe")
        fault.write_text(json.dumps({"error_rate": 1.0, "only_version": "v2"}))
        await asyncio.to_thread(wait_for_kind, project, "switch_back")
        await until_serving(project, "v1")   # the proxy has switched back; the step still holds
        await asyncio.to_thread(restart, project, monkeypatch, sig)
        proc.wait(timeout=60)
        seen = []
        for _ in range(40):            # two seconds: never the failing release again
            seen.append(await serving(project))
            await asyncio.sleep(0.05)
        return seen

    seen = asyncio.run(scenario())
    assert set(seen) == {"v1"}, seen
    h = history(project)[0]
    assert h["version"] == "v2" and h["state"] == "rolled_back", h
    assert project.status()["live"]["version"] == "v1"


@pytest.mark.parametrize("sig", SIGNALS)
def test_killed_during_a_manual_rollback_the_rollback_is_finished(
        project: Project, monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    setup(project, observe="0s")
    project.start_daemon()
    project.cli("deploy", "v1", "--path", str(project.release("v1")))
    project.cli("deploy", "v2", "--path", str(project.release("v2")))
    project.kill_daemon(signal.SIGTERM)
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "switch:5")
    project.start_daemon()

    async def scenario() -> None:
        proc = background(project, "rollback", "--reason", "drill")
        await asyncio.to_thread(wait_for_kind, project, "switch", "rollback")
        await until_serving(project, "v1")   # the proxy has switched; the step still holds
        await asyncio.to_thread(restart, project, monkeypatch, sig)
        proc.wait(timeout=60)
        assert await serving(project) == "v1"

    asyncio.run(scenario())
    h = history(project)[0]
    assert h["kind"] == "rollback" and h["version"] == "v1" and h["state"] == "succeeded", h
    st = project.status()
    assert st["live"]["version"] == "v1" and st["standby"]["version"] == "v2"
