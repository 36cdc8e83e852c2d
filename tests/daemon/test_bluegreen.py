"""Blue-green end to end: a real daemon, proxy worker and app processes, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.harness import Load, Project, get


def version_at(p: Project, path: str = "/") -> str:
    with urllib.request.urlopen(p.url(path), timeout=10) as r:
        return str(r.headers["X-Version"])


def test_deploy_status_rollback_and_standby(project: Project) -> None:
    project.start_daemon()
    first = project.deploy("v1")
    assert "v1 is live" in first.stderr
    assert version_at(project) == "v1"
    project.deploy("v2")
    assert version_at(project) == "v2"
    st = project.status()
    assert st["live"]["version"] == "v2" and st["live"]["slot"] == "green"
    assert st["standby"]["version"] == "v1" and st["standby"]["state"] == "warm"
    assert st["deploying"] is False

    rb = json.loads(project.cli("rollback", "--reason", "test", "--json").stdout)
    assert rb["version"] == "v1" and rb["switch_ms"] < 100
    assert version_at(project) == "v1"

    project.cli("stop-standby")
    st = project.status()
    assert st["live"]["version"] == "v1" and st["standby"] is None
    # Cold rollback: v2's slot is gone, so the previous release is started first, then switched to.
    rb = json.loads(project.cli("rollback", "--json").stdout)
    assert rb["version"] == "v2"
    assert version_at(project) == "v2"

    hist = json.loads(project.cli("history", "--json").stdout)
    assert [h["kind"] for h in hist[:4]] == ["rollback", "rollback", "deploy", "deploy"]
    assert all(h["state"] == "succeeded" for h in hist)
    steps = hist[-1]["steps"] + hist[-2]["steps"]
    assert any(s["name"] == "switch to green" and s["duration"] is not None for s in steps)


# Two workers: every one of them must have switched before `rollback` returns.
@pytest.mark.proxy_workers(2)
def test_zero_failed_requests_across_switches(project: Project) -> None:
    """50 keep-alive connections; 2 deploys and 20 rollback switches; not one request fails."""
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> Load:
        load = Load(project.port, connections=50)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(project.deploy, "v2")
        expected = "v2"
        for i in range(20):
            await asyncio.sleep(0.15)
            expected = (await asyncio.to_thread(project.verb, "rollback"))["version"]
            # A new request right after the switch reaches the new version.
            status, headers, _, rw = await get("127.0.0.1", project.port)
            assert status == 200 and headers["x-version"] == expected, (i, headers)
            rw[1].close()
        await asyncio.sleep(0.3)
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert load.failed == 0, load.errors[:10]
    assert load.ok > 500
    assert set(load.versions) == {"v1", "v2"}


def test_failing_release_never_gets_traffic(project: Project) -> None:
    project.write(ready_timeout="3s")
    project.start_daemon()
    project.deployed("v1")
    bad = project.deploy("v2", "--env", "FAULT_HEALTH=fail", check=False)
    assert bad.returncode == 1
    assert "v1 is still live" in bad.stderr and "503" in bad.stderr and "Traceback" not in bad.stderr
    assert version_at(project) == "v1"
    st = project.status()
    assert st["live"]["version"] == "v1" and st["standby"] is None and not st["deploying"]
    early = project.deploy("v3", "--env", "FAULT_EXIT=1", check=False)
    assert early.returncode == 1 and "exit" in early.stderr.lower()
    assert version_at(project) == "v1"


def test_inflight_requests_drain_and_websocket_survives(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> None:
        slow = asyncio.create_task(get("127.0.0.1", project.port, "/slow?ms=1500", timeout=20))
        reader, writer = await asyncio.open_connection("127.0.0.1", project.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(project.deploy, "v2")
        # The old slot is retired (drained) while both the slow request and the tunnel are open.
        stopper = asyncio.create_task(asyncio.to_thread(project.cli, "stop-standby"))
        await asyncio.sleep(0.3)
        for text in (b"hello", b"after switch"):
            writer.write(bytes([0x81, 0x80 | len(text)]) + b"\0\0\0\0" + text)
            frame = await asyncio.wait_for(reader.readexactly(2 + len(text)), 5)
            assert frame[2:] == text
        writer.write(b"\x88\x80\0\0\0\0")
        await writer.drain()
        writer.close()
        status, headers, body, _ = await slow
        assert status == 200 and headers["x-version"] == "v1" and body.startswith(b"slow from v1")
        await stopper

    asyncio.run(scenario())
    assert project.status()["standby"] is None


def test_second_deploy_is_refused_while_one_runs(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> str:
        # v2 takes 8 s to start: the second CLI (seconds on a busy machine) arrives while it does
        slow = asyncio.create_task(asyncio.to_thread(project.deploy, "v2", "--env", "FAULT_START_DELAY=8"))
        await asyncio.to_thread(project.wait_for_step, "start ")  # v2's deploy holds the pipeline
        second = await asyncio.to_thread(project.deploy, "v3", check=False)
        await slow
        assert second.returncode == 1
        return second.stderr

    err = asyncio.run(scenario())
    assert "deploy of v2" in err and "is running" in err


def test_daemon_killed_mid_deploy_restarts_into_the_truth(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")

    async def scenario() -> Load:
        load = Load(project.port, connections=20)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        deploying = asyncio.create_task(asyncio.to_thread(project.deploy, "v2", "--env", "FAULT_START_DELAY=3",
                                                          check=False))
        # Kill while green is starting (it sleeps 3 s before listening): wait for the step and the process,
        # not for a fixed time, so a slow machine cannot kill the daemon before the deploy was recorded.
        await asyncio.to_thread(project.wait_for_step, "start ")
        while not [pid for pid in pids_with_env(b"API_VERSION=v2") if pid_in(project, pid)]:
            await asyncio.sleep(0.05)
        project.kill_daemon(signal.SIGKILL)
        result = await deploying
        assert result.returncode != 0
        await asyncio.sleep(0.5)  # traffic keeps flowing with no daemon at all
        offline = json.loads((await asyncio.to_thread(project.cli, "history", "--json")).stdout)
        assert offline[-1]["version"] == "v1"  # history reads the state file while no daemon runs
        await asyncio.to_thread(project.start_daemon)
        await asyncio.sleep(0.5)
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert load.failed == 0, load.errors[:10]
    assert set(load.versions) == {"v1"}
    st = project.status()
    assert st["live"]["version"] == "v1" and st["standby"] is None and st["deploying"] is False
    hist = json.loads(project.cli("history", "--json").stdout)
    assert hist[0]["version"] == "v2" and hist[0]["state"] == "failed" and "interrupted" in hist[0]["reason"]
    # The half-started green instance was cleaned up.
    assert not [pid for pid in pids_with_env(b"API_VERSION=v2") if pid_in(project, pid)]


def test_an_instance_whose_pid_never_reached_the_state_is_stopped_by_the_next_daemon(project: Project) -> None:
    """The instant between spawning an instance and recording it: the process carries its tag."""
    import subprocess
    import sys

    project.start_daemon()
    project.deployed("v1")
    project.kill_daemon(signal.SIGKILL)
    tag = f"{(project.root / '.changeover').resolve()}:green:0"
    stray = subprocess.Popen([sys.executable, "server.py", "0"], cwd=project.release("v9"), start_new_session=True,
                             env={**os.environ, "API_VERSION": "v9", "CHANGEOVER_INSTANCE": tag},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        project.start_daemon()
        assert stray.wait(timeout=10) is not None  # stopped by the recovery, not by this test
        st = project.status()
        assert st["live"]["version"] == "v1" and st["standby"] is None
        assert version_at(project) == "v1"  # the adopted live instance was left alone
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def pids_with_env(needle: bytes) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def pid_in(p: Project, pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(str(p.root))
    except OSError:
        return False


def test_standby_is_retired_after_keep_standby_and_logs_are_readable(project: Project) -> None:
    project.write('[monitor]\nobserve = "1s"\nkeep_standby = "3s"\nmetrics_listen = ""\n')
    project.start_daemon()
    project.deployed("v1")
    project.deploy("v2", "--wait")
    assert project.status()["standby"]["version"] == "v1"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and project.status()["standby"] is not None:
        time.sleep(0.2)
    assert project.status()["standby"] is None
    logs = project.cli("logs", "--slot", "green", "-n", "5").stdout
    assert "example app v2 listening" in logs
    events = json.loads(project.cli("history", "--json").stdout)
    assert events[0]["state"] == "succeeded" and any(s["name"].startswith("observe") for s in events[0]["steps"])


def test_status_shows_live_traffic_numbers(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    for _ in range(30):
        version_at(project)
    time.sleep(0.3)
    st = project.status()
    m = st["metrics"]["blue"]
    assert m["requests"] >= 30 and m["p95"] is not None and m["error_rate"] == 0
    text = project.cli("status").stdout
    assert "live" in text and "v1" in text and "req/s" in text and "p95" in text


def test_rollback_with_schema_undoes_the_release_migrations(project: Project) -> None:
    import sqlite3

    db = project.root / "app.db"
    sqlite3.connect(db).close()
    mig = project.root / "migrations"
    mig.mkdir()
    (mig / "0001_items.up.sql").write_text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);\n")
    (mig / "0001_items.down.sql").write_text("DROP TABLE items;\n")
    project.write(f'[migrations]\ndatabase = "sqlite:///{db}"\ndir = "migrations"\n')
    project.start_daemon()
    project.deployed("v1")
    (mig / "0002_note.up.sql").write_text("ALTER TABLE items ADD COLUMN note TEXT;\n")
    (mig / "0002_note.down.sql").write_text("ALTER TABLE items DROP COLUMN note;\n")
    project.deployed("v2")
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(items)")]
    assert "note" in cols
    out = project.cli("rollback", "--schema", "--reason", "bad release")
    assert "schema rollback (1 migration of v2)" in out.stderr, out.stderr
    assert version_at(project) == "v1"
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(items)")]
    assert "note" not in cols and "name" in cols
    status = json.loads(project.cli("migrate", "status", "--json").stdout)
    states = {m["version"]: m["state"] for m in status["migrations"]}
    assert states["0001"] == "applied" and states["0002"] == "pending", states


# Two workers: the other serves while the killed one is replaced.
@pytest.mark.proxy_workers(2)
def test_a_killed_proxy_worker_is_replaced_at_once(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    project.deployed("v2")
    old_pid = project.status()["proxy"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = version_at(project)
            break
        except OSError:
            time.sleep(0.05)
    took = 10 - (deadline - time.monotonic())
    assert seen == "v2", "traffic did not come back"
    assert took < 5, took
    # With several workers the others kept serving meanwhile; the daemon replaces the dead one.
    # (the incident is recorded once the new worker is configured, a moment after its pid shows)
    def replaced(st: dict[str, Any]) -> bool:
        return st["proxy"]["pid"] != old_pid and any(e["kind"] == "proxy.restarted" for e in st["incidents"])

    deadline = time.monotonic() + 15
    st = project.status()
    while not replaced(st) and time.monotonic() < deadline:
        time.sleep(0.2)
        st = project.status()
    assert replaced(st) and st["standby"]["version"] == "v1", st
    # The new worker knows both slots: a warm rollback still works.
    assert json.loads(project.cli("rollback", "--json").stdout)["version"] == "v1"
    assert version_at(project) == "v1"


# Two workers: each is handed over.
@pytest.mark.proxy_workers(2)
def test_proxy_handover_drops_no_request(project: Project) -> None:
    """`reload-proxy` (after an upgrade) and a changed [proxy] at daemon start: a new worker shares
    the port, the old one finishes its connections and exits; not one request fails."""
    project.start_daemon()
    project.deployed("v1")
    project.deployed("v2")
    first = project.status()["proxy"]["pid"]

    async def scenario() -> tuple[Load, int, int]:
        load = Load(project.port, connections=50)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(0.5)
        out = json.loads((await asyncio.to_thread(project.cli, "reload-proxy", "--json")).stdout)
        await asyncio.sleep(1.5)
        # Now change [proxy] and restart the daemon: it hands over by itself.
        project.kill_daemon(signal.SIGTERM)
        text = project.config.read_text().replace('drain_timeout = "5s"', 'drain_timeout = "6s"')
        project.config.write_text(text)
        await asyncio.to_thread(project.start_daemon)
        await asyncio.sleep(1.5)
        done.set()
        await runner
        return load, out["old_pid"], out["pid"]

    load, old, new = asyncio.run(scenario())
    assert old == first and new != first
    assert load.failed == 0, load.errors[:10]
    assert load.ok > 1000 and set(load.versions) == {"v2"}
    st = project.status()
    assert st["proxy"]["pid"] not in (first, new)
    for pid in (first, new):
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split(b")")[1][:3]
    # The new worker has both slots: rollback is still instant.
    assert json.loads(project.cli("rollback", "--json").stdout)["switch_ms"] < 100


def test_status_and_top_during_an_observation_window(project: Project) -> None:
    import subprocess
    import sys

    project.write('[monitor]\nobserve = "30s"\nmetrics_listen = ""\n')
    project.start_daemon()
    project.deployed("v1")
    project.deployed("v2")  # returns once live; the window goes on
    text = project.cli("status").stdout
    assert "observing green" in text and "left" in text
    assert project.status()["deployment"]["phase"] == "observing"
    # Ctrl-C must reach `top` even when this test runs where SIGINT is ignored (a background job).
    proc = subprocess.Popen([sys.executable, "-m", "changeover", "top", "-c", str(project.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert "live" in out and "v2" in out
    project.cli("rollback")  # ends the window
    assert project.status()["deploying"] is False


def test_down_stops_everything_even_during_an_observation_window(project: Project) -> None:
    project.write('[monitor]\nobserve = "30s"\nmetrics_listen = ""\n')
    project.start_daemon()
    project.deployed("v1")
    project.deployed("v2")
    assert project.status()["deployment"]["phase"] == "observing"
    project.cli("down")
    assert project.daemon is not None
    project.daemon.wait(timeout=30)
    project.daemon = None
    time.sleep(0.5)
    assert not [pid for v in (b"API_VERSION=v1", b"API_VERSION=v2") for pid in pids_with_env(v) if pid_in(project, pid)]
    hist = json.loads(project.cli("history", "--json").stdout)
    assert hist[0]["version"] == "v2" and hist[0]["state"] == "failed" and "down" in hist[0]["reason"]
