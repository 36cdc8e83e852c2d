"""A project too deep in the file system for its unix sockets' 107 bytes (HAProxy: 97), as a CI
workspace or a monorepo can be: the daemon, every proxy worker and HAProxy still start, the CLI
finds the daemon, and a daemon killed and started again adopts what is running."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from changeover.config import locate
from tests.daemon.harness import Load, Project


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Project]:
    root = tmp_path / ("d" * 60) / ("e" * 40)
    root.mkdir(parents=True)
    p = Project(root, workers=2)
    try:
        yield p
    finally:
        p.teardown()


def under_load(p: Project, steps: Callable[[], None]) -> Load:
    async def scenario() -> Load:
        load = Load(p.port, connections=10)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(steps)
        await asyncio.sleep(0.3)
        done.set()
        await runner
        return load

    return asyncio.run(scenario())


def test_a_deep_project_deploys_switches_and_survives_a_daemon_restart(deep: Project) -> None:
    deep.write()
    sock = locate(deep.config).socket_path
    assert not sock.is_relative_to(deep.root) and len(str(sock)) <= 107
    deep.start_daemon()
    deep.deploy("v1")

    def steps() -> None:
        deep.deploy("v2")
        deep.kill_daemon(signal.SIGKILL)
        deep.start_daemon()                # adopts both proxy workers at their short sockets
        assert deep.status()["live"]["version"] == "v2"
        deep.deploy("v3")

    load = under_load(deep, steps)
    assert load.failed == 0 and load.ok > 0, load.errors[:5]
    assert set(load.versions) == {"v1", "v2", "v3"}
    assert "v3" in deep.cli("status").stdout


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="the haproxy binary is not installed")
def test_a_deep_project_on_the_haproxy_engine(deep: Project) -> None:
    deep.write('engine = "haproxy"')
    deep.start_daemon()
    deep.deploy("v1")
    load = under_load(deep, lambda: deep.deploy("v2"))
    assert load.failed == 0 and load.ok > 0, load.errors[:5]
    assert deep.status()["live"]["version"] == "v2"


@pytest.mark.parametrize("engine", ["embedded", "haproxy"])
def test_a_project_whose_path_holds_spaces_commas_and_accents(engine: str) -> None:
    """`~/My Sites, 2026/café`: HAProxy would read a space or a comma in its socket paths
    (`stats socket`, `-S path,mode,600`) as the end of the path, so those move (sockets.py)."""
    if engine == "haproxy" and shutil.which("haproxy") is None:
        pytest.skip("the haproxy binary is not installed")
    top = Path(tempfile.mkdtemp(prefix="co-sp-"))     # short: the sockets stay under the project
    root = top / "My Sites, 2026" / "café"
    root.mkdir(parents=True)
    p = Project(root)
    try:
        p.write(f'engine = "{engine}"')
        p.start_daemon()
        p.deploy("v1")
        load = under_load(p, lambda: p.deploy("v2"))
        assert load.failed == 0 and load.ok > 0, load.errors[:5]
        assert p.status()["live"]["version"] == "v2"
    finally:
        p.teardown()
        shutil.rmtree(top, ignore_errors=True)
