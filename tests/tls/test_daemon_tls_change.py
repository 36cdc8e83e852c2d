"""[proxy.tls] added to a running project: the next daemon start hands the proxy over to a worker
with the HTTPS listener, without a failed request on HTTP meanwhile."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover.loadgen import Load, get
from tests.daemon.harness import Project, free_port

from .certs import TestCA


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path, workers=2)    # every proxy worker is handed over to one with HTTPS
    try:
        yield p
    finally:
        p.teardown()


def test_adding_tls_hands_over_without_a_gap(project: Project, tmp_path: Path) -> None:
    ca, tls_port = TestCA(tmp_path), free_port()
    leaf = ca.leaf("site", ["localhost"])
    project.write()
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> tuple[Load, int]:
        load = Load(project.port, connections=8, pause=0.002)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(0.5)
        with project.config.open("a") as f:
            f.write(f'\n[proxy.tls]\nlisten = "127.0.0.1:{tls_port}"\ncert = "{leaf.cert}"\nkey = "{leaf.key}"\n')
        await asyncio.to_thread(project.kill_daemon, signal.SIGTERM)
        await asyncio.to_thread(project.start_daemon)    # other [proxy] settings: a handover
        status, _, _, conn = await get("localhost", tls_port, "/", tls=ssl.create_default_context(cafile=str(ca.path)))
        if conn is not None:
            conn[1].close()
        await asyncio.sleep(0.5)
        done.set()
        await runner
        return load, status

    load, status = asyncio.run(scenario())
    assert status == 200
    assert load.failed == 0 and load.ok > 100, (load.summary(), load.errors[:5])
    events = [e["kind"] for e in project.status()["incidents"]] if "incidents" in project.status() else []
    assert "proxy.restart_failed" not in events
