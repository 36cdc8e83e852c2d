"""A real daemon with [proxy.tls]: deploys switch and roll back (by hand and automatically) under
HTTPS load with 0 failed requests; the HTTP listener redirects, its health check stays on HTTP."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover.loadgen import Load
from tests.daemon.harness import Project, free_port
from tests.daemon.test_auto_rollback import configure, deploy_then_break

from .certs import TestCA
from .conftest import http_get


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path)
    try:
        yield p
    finally:
        p.teardown()


def tls_section(ca: TestCA, port: int, extra: str = "") -> str:
    leaf = ca.leaf("site", ["localhost", "127.0.0.1"])
    return f'\n[proxy.tls]\nlisten = "127.0.0.1:{port}"\ncert = "{leaf.cert}"\nkey = "{leaf.key}"\n{extra}\n'


def https_load(ca: TestCA, port: int, connections: int = 8) -> Load:
    return Load(port, connections=connections, host="localhost", pause=0.002,
                tls=ssl.create_default_context(cafile=str(ca.path)))


def test_deploys_over_https_without_a_failed_request(project: Project, tmp_path: Path) -> None:
    ca, tls_port = TestCA(tmp_path), free_port()
    # a smoke check through the proxy: with https_redirect the daemon goes in over HTTPS too
    project.write('[[checks.smoke]]\npath = "/health"\n')
    with project.config.open("a") as f:
        f.write(tls_section(ca, tls_port, "https_redirect = true\nhsts = 3600"))
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> Load:
        load = https_load(ca, tls_port)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(0.5)
        for version in ("v2", "v3"):
            await asyncio.to_thread(project.deploy, version)
            await asyncio.sleep(0.3)
        await asyncio.to_thread(project.cli, "rollback")
        await asyncio.sleep(0.3)
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert load.failed == 0, (load.summary(), load.errors[:5])
    assert {"v1", "v2", "v3"} <= set(load.versions), load.summary()
    assert project.status()["live"]["version"] == "v2"
    # the HTTP listener sends browsers to https; the health check stays on HTTP
    status, headers, _ = http_get(project.port, "/cart", host="localhost")
    assert (status, headers["location"]) == (301, f"https://localhost:{tls_port}/cart")
    assert http_get(project.port, "/_changeover/health", host="localhost")[0] == 200
    assert project.status()["proxy"]["tls"]["listen"] == f"127.0.0.1:{tls_port}"
    hist = json.loads(project.cli("history", "--json").stdout)
    through = [st for h in hist if h["kind"] == "deploy" for st in h["steps"] if "through the proxy" in st["name"]]
    assert len(through) == 3 and all(st["state"] == "ok" for st in through), through


def test_automatic_rollback_over_https(project: Project, tmp_path: Path) -> None:
    ca, tls_port = TestCA(tmp_path), free_port()
    fault, _, _ = configure(project, observe="30s")
    with project.config.open("a") as f:
        f.write(tls_section(ca, tls_port))
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> tuple[Load, object]:
        load = https_load(ca, tls_port)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(2)                     # blue's baseline
        result, _ = await deploy_then_break(project, "v2", fault, {"error_rate": 1.0})
        done.set()
        await runner
        return load, result

    load, result = asyncio.run(scenario())
    assert result.returncode == 1 and "v2 was rolled back automatically" in result.stderr, result.stderr  # type: ignore[attr-defined]
    assert project.status()["live"]["version"] == "v1"
    assert load.failed_versions.get("v1", 0) == 0 and load.failed_versions.get("proxy", 0) == 0, load.summary()
    assert load.versions["v1"] > 100
