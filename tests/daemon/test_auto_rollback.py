"""Monitoring and automatic rollback, end to end: real daemon, proxy worker, app processes.

Each release is healthy through verification; its fault is switched on (FAULT_FILE, aimed at
that release only) right after it goes live. The deploy (--wait) must end rolled back with the
right reason, and the old version must answer again.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from changeover.loadgen import Load, get
from tests.daemon.harness import Project, free_port

MONITOR = """
[env]
FAULT_FILE = "{fault}"
DATABASE_URL = "{db}"

[checks.pre]
database = "off"

[[checks.pre.services]]
name = "payments"
tcp = "127.0.0.1:{service_port}"
critical = true

[monitor]
observe = "{observe}"
window = "5s"
latency_window = "2s"
latency_min_samples = 20
baseline = "10s"
critical_interval = "500ms"
db_probe_interval = "500ms"
crash_loop = {{ crashes = 3, within = "60s" }}
synthetic_rate = {synthetic}
metrics_listen = "127.0.0.1:{metrics_port}"

[notify]
backoff = "100ms"
[[notify.webhooks]]
url = "http://127.0.0.1:{hook_port}/hook"
"""


class Hooks:
    """A real webhook receiver on a free port."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.events.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> list[str]:
        return [str(e.get("event")) for e in self.events]


class Service:
    """A 'critical service' the release depends on: a TCP listener we can take down."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
                c.close()
            except OSError:
                return

    def down(self) -> None:
        self.sock.close()


def configure(p: Project, *, observe: str, synthetic: float = 5) -> tuple[Path, Hooks, Service]:
    fault = p.root / "fault.json"
    fault.write_text("{}")
    db = p.root / "app.db"
    import sqlite3

    sqlite3.connect(db).close()
    hooks, service = Hooks(), Service()
    p.write(MONITOR.format(fault=fault, db=f"sqlite:///{db}", service_port=service.port, observe=observe,
                           synthetic=synthetic, metrics_port=free_port(), hook_port=hooks.port))
    return fault, hooks, service


async def deploy_then_break(p: Project, version: str, fault: Path, spec: dict[str, Any],
                            before: Any = None, quiet: bool = False) -> tuple[Any, float | None]:
    """Deploy with --wait; once `version` is live, switch the fault on and time how long until the
    old version answers again."""
    task = asyncio.create_task(asyncio.to_thread(p.deploy, version, "--wait", check=False))
    onset = None
    while not task.done():
        if onset is not None and quiet:  # send nothing through the proxy once the fault is on
            await asyncio.sleep(0.05)
            continue
        try:
            _, h, _, c = await get("127.0.0.1", p.port, "/health", timeout=2)
            if c is not None:
                c[1].close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            h = {}
        if onset is None and h.get("x-version") == version:
            await asyncio.sleep(0.5)  # the window has started and saw healthy traffic first
            if before is not None:
                before()
            fault.write_text(json.dumps({**spec, "only_version": version}))
            onset = time.monotonic()
        elif onset is not None and h.get("x-version") not in (version, None):
            reaction = time.monotonic() - onset
            return await task, reaction
        await asyncio.sleep(0.01)
    return await task, None


def test_faults_after_the_switch_are_rolled_back_with_the_right_reason(project: Project) -> None:
    fault, hooks, service = configure(project, observe="30s")
    project.start_daemon()
    project.deployed("v1")
    reactions: dict[str, float | None] = {}

    async def scenario() -> Load:
        load = Load(project.port, connections=8, pause=0.01)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(2)  # blue's baseline
        # 100 % errors: whichever of the two traffic triggers judges first is right.
        cases: list[tuple[str, dict[str, Any], tuple[str, ...], Any]] = [
            ("v2", {"error_rate": 1.0}, ("consecutive_failures", "error_rate"), None),
            ("v3", {"error_rate": 0.10}, ("error_rate",), None),
            ("v4", {"latency_ms": 200}, ("latency",), None),
            # The database down: the database probe, or the app's /health route failing every
            # request (this test polls it) — each names what is broken.
            ("v5", {"db": "down"}, ("database", "consecutive_failures: route GET /health"), None),
            ("v6", {}, ("critical",), service.down),
        ]
        for version, spec, reasons, before in cases:
            result, reaction = await deploy_then_break(project, version, fault, spec, before)
            fault.write_text("{}")
            assert result.returncode == 1, result.stderr
            assert any(f"{version} was rolled back automatically: {r}" in result.stderr for r in reasons), \
                result.stderr
            assert "v1 is live again" in result.stderr
            reactions[reasons[0]] = reaction
            await asyncio.sleep(1)
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert reactions["consecutive_failures"] is not None and reactions["consecutive_failures"] < 2.0, reactions
    assert project.status()["live"]["version"] == "v1"
    hist = json.loads(project.cli("history", "--json").stdout)
    rolled = [h for h in hist if h["state"] == "rolled_back"]
    assert len(rolled) == 5
    evidence = next(c for c in rolled[-1]["checks"] if c["name"] == "rollback trigger")
    # The numbers behind the verdict are kept, whichever of the two traffic triggers judged first.
    data = evidence["data"]
    assert data["requests"] >= 10 if "requests" in data else data["consecutive_failures"] >= data["limit"], data
    # Requests v1 answered never failed; only the faulty releases' own errors did.
    assert load.failed_versions.get("v1", 0) == 0 and load.failed_versions.get("proxy", 0) == 0, \
        (load.summary(), load.errors[-10:])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and hooks.names().count("rolled_back") < 5:
        time.sleep(0.1)
    assert {"deploy_started", "live", "rolled_back"} <= set(hooks.names())


def test_crash_loop_is_rolled_back(project: Project) -> None:
    fault, _, _ = configure(project, observe="30s", synthetic=0)
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> Any:
        result, _ = await deploy_then_break(project, "v2", fault, {"exit": True}, quiet=True)
        return result

    result = asyncio.run(scenario())
    assert result.returncode == 1 and "rolled back automatically: crash_loop" in result.stderr, result.stderr
    incidents = project.status()["incidents"]
    assert any(e["kind"] == "instance.crashed" and e["slot"] == "green" for e in incidents), incidents


def test_healthy_release_under_noise_is_finalised_and_manual_rollback_records_why(project: Project) -> None:
    fault, hooks, _ = configure(project, observe="8s")
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> tuple[Any, Load]:
        load = Load(project.port, connections=8, pause=0.005)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(1.5)
        result, _ = await deploy_then_break(project, "v2", fault, {"error_rate": 0.01, "latency_ms": 1})
        done.set()
        await runner
        return result, load

    result, load = asyncio.run(scenario())
    assert result.returncode == 0, result.stderr
    assert load.ok > 1000 and load.failed_versions.get("v2", 0) > 0  # the noise was real
    st = project.status()
    assert st["live"]["version"] == "v2" and st["standby"]["state"] == "warm"
    assert "finalised" in hooks.names() or time.sleep(1) or "finalised" in hooks.names()

    # A manual rollback during the next window stops it and records who and why.
    fault.write_text("{}")

    async def manual() -> tuple[Any, Any]:
        deploying = asyncio.create_task(asyncio.to_thread(project.deploy, "v3", "--wait", check=False))
        while project.status()["live"]["version"] != "v3":
            await asyncio.sleep(0.1)
        rb = await asyncio.to_thread(project.cli, "rollback", "--reason", "customers report a bug", "--json")
        return await deploying, rb

    deployed, rb = asyncio.run(manual())
    assert deployed.returncode == 1 and "rolled back manually" in deployed.stderr
    assert json.loads(rb.stdout)["version"] == "v2"
    hist = json.loads(project.cli("history", "--json").stdout)
    assert hist[0]["state"] == "rolled_back" and "customers report a bug" in hist[0]["reason"]
    assert "@" in hist[0]["reason"]  # who
    metrics = st["metrics"]
    assert metrics["endpoint"].endswith("/metrics")
    import urllib.request

    with urllib.request.urlopen(metrics["endpoint"], timeout=5) as r:
        text = r.read().decode()
    assert "changeover_requests_total" in text or "changeover_" in text


def test_automatic_rollback_is_refused_after_an_incompatible_migration(project: Project) -> None:
    """Code-only rollback would break the old release on a contracted schema: alert instead."""
    from changeover import config as config_mod
    from changeover.migrations import commands as migrate

    fault, hooks, _ = configure(project, observe="30s")
    mig = project.root / "migrations"
    mig.mkdir()
    (mig / "0001_items.up.sql").write_text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, old TEXT);\n")
    (mig / "0001_items.down.sql").write_text("DROP TABLE items;\n")
    db = project.root / "app.db"
    with project.config.open("a") as f:
        f.write(f'\n[migrations]\ndatabase = "sqlite:///{db}"\ndir = "migrations"\n')
    project.start_daemon()
    project.deployed("v1")
    (mig / "0002_drop_old.up.sql").write_text("-- changeover:phase contract\nALTER TABLE items DROP COLUMN old;\n")
    (mig / "0002_drop_old.down.sql").write_text("ALTER TABLE items ADD COLUMN old TEXT;\n")

    def contract_under_v2() -> None:
        # Someone applies the contract migration while v2 is live and the old code still warm.
        migrate.up(config_mod.load(project.config), release="v2")

    async def scenario() -> Any:
        load = Load(project.port, connections=4, pause=0.01)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        result, _ = await deploy_then_break(project, "v2", fault, {"error_rate": 1.0}, before=contract_under_v2)
        done.set()
        await runner
        return result

    result = asyncio.run(scenario())
    fault.write_text("{}")
    assert result.returncode == 1 and "automatic rollback was refused" in result.stderr, result.stderr
    assert "0002" in result.stderr
    assert project.status()["live"]["version"] == "v2"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "rollback_refused" not in hooks.names():
        time.sleep(0.1)
    assert "rollback_refused" in hooks.names()


def test_a_release_after_a_rolled_back_one_is_judged_on_its_own_traffic(project: Project) -> None:
    """The slot's previous occupant failed every request; the next release in that slot must not
    inherit its failure streak."""
    fault, _, _ = configure(project, observe="3s")
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> tuple[Any, Any]:
        load = Load(project.port, connections=4, pause=0.01)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        bad, _ = await deploy_then_break(project, "v2", fault, {"error_rate": 1.0})
        fault.write_text("{}")
        good = await asyncio.to_thread(project.deploy, "v3", "--wait", check=False)
        done.set()
        await runner
        return bad, good

    bad, good = asyncio.run(scenario())
    assert bad.returncode == 1 and "rolled back automatically" in bad.stderr
    assert good.returncode == 0, good.stderr
    assert project.status()["live"]["version"] == "v3"


def test_a_deploy_that_fails_before_its_switch_is_notified(project: Project) -> None:
    _, hooks, _ = configure(project, observe="0s")
    project.write(project.extra, ready_timeout="3s")
    project.start_daemon()
    project.deployed("v1")
    bad = project.deploy("v2", "--env", "FAULT_HEALTH=fail", check=False)
    assert bad.returncode == 1 and "v1 is still live" in bad.stderr, bad.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "failed" not in hooks.names():
        time.sleep(0.1)
    ev = next(e for e in hooks.events if e.get("event") == "failed")
    assert ev["version"] == "v2" and "start" in ev["reason"], ev
