"""The daemon's behaviour on each data plane: the same deploys, switches, rollbacks and restarts
through the embedded proxy and through HAProxy (`[proxy] engine = "haproxy"`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal

import pytest

from changeover.loadgen import Load, get
from tests.daemon.harness import Project

# Several embedded workers: a switch or a restart must not leave one of them behind.
ENGINES = [pytest.param("embedded", id="embedded", marks=pytest.mark.proxy_workers(2)),
           pytest.param("haproxy", id="haproxy", marks=pytest.mark.skipif(
               shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/ensure-services.sh)"))]


def engine_project(project: Project, engine: str, extra: str = "") -> None:
    project.write(extra, app="")
    text = project.config.read_text().replace("[proxy]\n", f'[proxy]\nengine = "{engine}"\n', 1)
    project.config.write_text(text)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ENGINES)
def test_switches_rollbacks_and_a_restart_fail_no_request(project: Project, engine: str) -> None:
    fault = project.root / "fault.json"
    fault.write_text("{}")
    engine_project(project, engine, f'[env]\nFAULT_FILE = "{fault}"\n\n[monitor]\nobserve = "20s"\n'
                                    'window = "2s"\nconsecutive_failures = 5\nmetrics_listen = ""\n')
    project.start_daemon()
    assert project.status()["proxy"]["engine"] == engine
    project.deployed("v1")

    async def scenario() -> Load:
        load = Load(project.port, connections=50)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(project.deploy, "v2")
        await asyncio.to_thread(project.cli, "promote")
        expected = "v2"
        for _ in range(20):
            expected = (await asyncio.to_thread(project.verb, "rollback"))["version"]
            status, headers, _, rw = await get("127.0.0.1", project.port)
            assert status == 200 and headers["x-version"] == expected
            rw[1].close()
        # SIGKILL the daemon: traffic goes on; the next daemon adopts the data plane as it is.
        await asyncio.to_thread(project.kill_daemon, signal.SIGKILL)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(project.start_daemon)
        st = await asyncio.to_thread(project.status)
        assert st["live"]["version"] == expected
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert load.failed == 0, load.errors[:5]
    assert set(load.versions) == {"v1", "v2"}
    # Automatic rollback on this engine: a release failing every request is rolled back.
    live = project.status()["live"]["version"]
    nxt = "v3"
    proc = asyncio.run(_deploy_and_break(project, nxt, fault))
    assert proc.returncode == 1 and "rolled back automatically" in proc.stderr, proc.stderr
    assert project.status()["live"]["version"] == live


async def _deploy_and_break(project: Project, version: str, fault: object) -> object:
    from pathlib import Path

    assert isinstance(fault, Path)
    task = asyncio.create_task(asyncio.to_thread(project.deploy, version, "--wait", check=False))
    while not task.done():
        try:
            _, h, _, c = await get("127.0.0.1", project.port, "/", timeout=2)
            if c is not None:
                c[1].close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            h = {}
        if h.get("x-version") == version:
            fault.write_text(json.dumps({"error_rate": 1.0, "only_version": version}))
        await asyncio.sleep(0.05)
    return await task
