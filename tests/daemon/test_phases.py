"""The phase verbs and the config read at every deploy, through the CLI of a real daemon."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from changeover import api, rpc
from changeover.config import locate
from changeover.errors import DaemonError
from changeover.loadgen import get
from tests.daemon.harness import Project
from tests.daemon.test_restart_faults import background, serving, wait_for_kind


def js(p: Any) -> Any:
    return json.loads(p.stdout)


def history(project: Project) -> list[dict[str, Any]]:
    return list(js(project.cli("history", "--json")))


def test_prepare_everywhere_then_switch(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    out = js(project.deploy("v2", "--no-switch", "--json"))
    assert out["state"] == "prepared" and out["slot"] == "green"
    st = project.status()
    assert st["live"]["version"] == "v1" and st["deployment"]["phase"] == "prepared"
    assert asyncio.run(serving(project)) == "v1", "a prepared release gets no traffic"
    refused = project.deploy("v3", check=False)
    assert refused.returncode == 1 and "prepared" in refused.stderr
    done = js(project.cli("switch", "--json"))
    assert done["state"] == "succeeded" and done["version"] == "v2"
    assert asyncio.run(serving(project)) == "v2"


def test_abort_a_prepared_release(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    project.deploy("v2", "--no-switch")
    out = js(project.cli("abort", "--reason", "not today", "--json"))
    assert out["state"] == "aborted"
    st = project.status()
    assert st["live"]["version"] == "v1" and st["standby"] is None and not st["deploying"]
    assert history(project)[0]["state"] == "aborted"


def test_promote_ends_the_window_now(project: Project) -> None:
    project.write('[monitor]\nobserve = "5m"\nmetrics_listen = ""\n')
    project.start_daemon()
    project.deployed("v1")
    project.deployed("v2")
    assert project.status()["deployment"]["phase"] == "observing"
    out = js(project.cli("promote", "--json"))
    assert out["state"] == "succeeded" and out["promoted"] is True
    h = history(project)[0]
    assert h["state"] == "succeeded" and "promoted" in (h["reason"] or "")
    project.deployed("v3")  # the hotfix right after: no waiting for the window


def test_rollback_during_verification_through_the_proxy_aborts_and_switches_back(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write('[[checks.smoke]]\nname = "home"\npath = "/"\n')
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "verify_public:5")
    project.start_daemon()
    project.deployed("v1")
    proc = background(project, "deploy", "v2", "--path", str(project.release("v2")))
    wait_for_kind(project, "verify_public")
    out = js(project.cli("rollback", "--reason", "wrong build", "--json"))
    proc.wait(timeout=60)
    assert out["version"] == "v1"
    assert asyncio.run(serving(project)) == "v1"
    h = history(project)[0]
    assert h["version"] == "v2" and h["state"] == "rolled_back" and "wrong build" in h["reason"]


def test_every_deploy_reads_the_file_as_it_is_now(project: Project, tmp_path: Path) -> None:
    project.start_daemon()
    project.deployed("v1")
    # A new [env] value and a smoke test that fails: both taken by the next deploy.
    project.write('[env]\nGREETING = "new"\n\n[[checks.smoke]]\nname = "missing"\npath = "/nope"\n')
    bad = project.deploy("v2", check=False)
    assert bad.returncode == 1 and "missing" in bad.stderr
    project.write('[env]\nGREETING = "new"\n')
    project.deployed("v2")
    assert history(project)[0]["state"] == "succeeded"
    # An invalid file refuses the deploy with file and key, and changes nothing.
    text = project.config.read_text()
    project.config.write_text(text + '\n[app2]\nx = 1\n')
    refused = project.deploy("v3", check=False)
    assert refused.returncode == 2 and "changeover.toml" in refused.stderr and "app2" in refused.stderr
    assert "Traceback" not in refused.stderr and history(project)[0]["version"] == "v2"
    # ...while the controls of the running daemon still work.
    broken = project.config.read_text().replace("[proxy]", "[proxy")
    project.config.write_text(broken)
    st = js(project.cli("status", "--json"))
    assert st["live"]["version"] == "v2"
    assert history(project)[0]["version"] == "v2"
    back = js(project.cli("rollback", "--json"))
    assert back["version"] == "v1"
    project.config.write_text(text)


def test_check_pre_and_deploy_agree_on_the_database(project: Project) -> None:
    project.write('[env]\nDATABASE_URL = "postgresql://postgres@127.0.0.1:1/nowhere"\n')
    project.start_daemon()
    check = project.cli("check", "pre", check=False)
    deploy = project.deploy("v1", check=False)
    assert check.returncode == 1 and deploy.returncode == 1
    assert "database" in deploy.stderr and "pre-deploy checks" in deploy.stderr


def test_reload_and_sighup_apply_a_changed_proxy_section(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    pid0 = project.status()["proxy"]["pid"]
    text = project.config.read_text()
    project.config.write_text(text.replace('drain_timeout = "5s"', 'drain_timeout = "6s"'))
    project.cli("reload")
    pid1 = project.status()["proxy"]["pid"]
    assert pid1 != pid0
    project.config.write_text(text)
    assert project.daemon is not None
    project.daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while project.status()["proxy"]["pid"] == pid1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert project.status()["proxy"]["pid"] != pid1
    assert asyncio.run(serving(project)) == "v1"


def test_a_client_of_another_protocol_version_gets_a_clear_error(project: Project) -> None:
    project.start_daemon()
    sock = locate(project.config).socket_path
    with pytest.raises(DaemonError, match="protocol"):
        asyncio.run(rpc.call(sock, "status", {}, protocol=api.PROTOCOL - 1))
    with pytest.raises(DaemonError, match="protocol"):
        asyncio.run(rpc.call(sock, "status", {}))


def test_down_drains_in_flight_requests_before_stopping(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> tuple[int, float, float]:
        slow = asyncio.create_task(get("127.0.0.1", project.port, "/slow?ms=1500", timeout=10))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await asyncio.to_thread(project.cli, "down")
        took = time.monotonic() - t0
        status, _, _, rw = await slow
        if rw is not None:
            rw[1].close()
        return status, took, time.monotonic() - t0

    status, took, _ = asyncio.run(scenario())
    assert status == 200, "the in-flight request was cut"
    assert took >= 1.0, "down returned before the drain was done"
    assert project.daemon is not None
    project.daemon.wait(timeout=30)
    project.daemon = None
    assert not locate(project.config).socket_path.exists()


def test_cold_rollback_is_verified_before_the_switch_and_observed(project: Project) -> None:
    project.write('[[checks.smoke]]\nname = "home"\npath = "/"\n\n[monitor]\nobserve = "1s"\nmetrics_listen = ""\n')
    project.start_daemon()
    project.deployed("v1")
    project.deploy("v2", "--wait")
    project.cli("stop-standby")
    # v1's code is broken now (think: it reads a column a contract migration dropped).
    (project.root / "releases" / "v1" / "server.py").write_text(
        (project.root / "releases" / "v1" / "server.py").read_text().replace(
            'return self.send(200, f"hello from {VERSION}\\n"', 'return self.send(500, "broken\\n"'))
    bad = project.cli("rollback", "--json", check=False)
    assert bad.returncode == 1 and "verify" in bad.stderr
    assert asyncio.run(serving(project)) == "v2"
    h = history(project)[0]
    assert h["kind"] == "rollback" and h["state"] == "failed"
    # Repaired: the cold rollback passes verification, switches, and is observed.
    (project.root / "releases" / "v1" / "server.py").write_text(
        (project.root / "releases" / "v1" / "server.py").read_text().replace(
            'return self.send(500, "broken\\n"', 'return self.send(200, f"hello from {VERSION}\\n"'))
    out = js(project.cli("rollback", "--json"))
    assert out["version"] == "v1"
    h = history(project)[0]
    kinds = [s["kind"] for s in h["steps"]]
    assert kinds.index("verify_private") < kinds.index("switch") < kinds.index("observe"), kinds


def test_piped_output_is_not_wrapped_and_top_prints(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    project.deployed("v2")
    project.cli("rollback", "--reason", "a reason long enough to need more than eighty columns " * 2)
    wide = project.cli("history")
    assert all(len(line) <= 400 for line in wide.stdout.splitlines())
    assert any(len(line) > 80 for line in wide.stdout.splitlines()), "piped history wraps at 80 columns"
    import subprocess
    import sys

    top = subprocess.Popen([sys.executable, "-m", "changeover", "top", "--interval", "0.2", "-c", str(project.config)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert top.stdout is not None
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("v1" in line for line in seen):
        seen.append(top.stdout.readline())
    top.kill()
    top.communicate(timeout=10)
    assert any("live" in line and "v1" in line for line in seen), seen


def test_migrations_run_on_the_database_the_release_checks(project: Project, pg_url: str) -> None:
    """`deploy --env DATABASE_URL=…` migrates the database it checks, not the daemon's."""
    import uuid

    import psycopg

    other = f"co_other_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other}"')
    other_url = f"postgresql://postgres@127.0.0.1:5432/{other}"
    try:
        mig = project.root / "migrations"
        mig.mkdir()
        (mig / "0001_items.up.sql").write_text("CREATE TABLE items (id bigint PRIMARY KEY);\n")
        (mig / "0001_items.down.sql").write_text("DROP TABLE items;\n")
        project.write(f'[env]\nDATABASE_URL = "{pg_url}"\n\n[migrations]\ndir = "migrations"\n')
        project.start_daemon()
        project.deploy("v1", "--env", f"DATABASE_URL={other_url}")

        def has_items(url: str) -> bool:
            with psycopg.connect(url) as conn:
                return conn.execute("SELECT to_regclass('items') IS NOT NULL").fetchone()[0]  # type: ignore[index,no-any-return]

        assert has_items(other_url) and not has_items(pg_url)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def test_an_unsafe_pending_migration_fails_the_deploy_a_contract_one_is_left_pending(
        project: Project, pg_url: str) -> None:
    mig = project.root / "migrations"
    mig.mkdir()
    (mig / "0001_items.up.sql").write_text("CREATE TABLE items (id bigint PRIMARY KEY, name text);\n")
    (mig / "0001_items.down.sql").write_text("DROP TABLE items;\n")
    project.write(f'[migrations]\ndatabase = "{pg_url}"\ndir = "migrations"\n')
    project.start_daemon()
    project.deployed("v1")
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 100) g")
    # A rename breaks the running code: unsafe, the deploy stops at its migrations step.
    (mig / "0002_rename.up.sql").write_text("ALTER TABLE items RENAME COLUMN name TO title;\n")
    (mig / "0002_rename.down.sql").write_text("ALTER TABLE items RENAME COLUMN title TO name;\n")
    bad = project.deploy("v2", check=False)
    assert bad.returncode == 1 and "migrations (expand)" in bad.stderr and "v1 is still live" in bad.stderr
    assert "renam" in bad.stderr.lower()
    assert not any(s["kind"] == "start" for s in history(project)[0]["steps"])
    (mig / "0002_rename.up.sql").unlink()
    (mig / "0002_rename.down.sql").unlink()
    # Dropping a column is contract: the deploy goes on and says the contract step is pending.
    (mig / "0002_drop.up.sql").write_text("ALTER TABLE items DROP COLUMN name;\n")
    (mig / "0002_drop.down.sql").write_text("ALTER TABLE items ADD COLUMN name text;\n")
    ok = project.deploy("v2")
    assert "contract pending" in ok.stderr, ok.stderr


def test_status_forgets_incidents_of_instances_that_are_gone(project: Project) -> None:
    import os

    project.start_daemon()
    project.deployed("v1")
    pid = project.status()["live"]["instances"][0]["pid"]
    os.kill(pid, signal.SIGKILL)           # the supervisor restarts it: an incident
    deadline = time.monotonic() + 20
    while not project.status()["incidents"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(e["kind"].startswith("instance.") for e in project.status()["incidents"])
    project.deployed("v2")
    project.deployed("v3")                   # v1's slot now runs v3: its old instances are gone
    assert not [e for e in project.status()["incidents"] if e["kind"].startswith("instance.")]


def test_down_does_not_wait_for_an_open_websocket_and_closes_it_with_1001(project: Project) -> None:
    # a drain limit far longer than `down` takes on a busy machine: waiting for it would show
    project.config.write_text(project.config.read_text().replace('drain_timeout = "5s"', 'drain_timeout = "40s"'))
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", project.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0]
        t0 = time.monotonic()
        await asyncio.to_thread(project.cli, "down")
        took = time.monotonic() - t0
        frame = await asyncio.wait_for(reader.read(64), 5)
        writer.close()
        return took, frame

    took, frame = asyncio.run(scenario())
    # `down` must not sit the 40 s drain limit out for a tunnel
    assert took < 25.0, f"down waited {took:.1f}s for the WebSocket"
    assert frame[:1] == b"\x88" and frame[2:4] == (1001).to_bytes(2, "big"), f"no 1001 close frame: {frame!r}"
    assert project.daemon is not None
    project.daemon.wait(timeout=30)
    project.daemon = None
