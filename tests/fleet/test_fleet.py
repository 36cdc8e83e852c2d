"""A fleet of three real daemons (each with the example app) on a real three-member etcd, on
loopback, behind a real HAProxy that health-checks each host: deploy, manual and automatic
rollback under keep-alive load, the deploy lock, a dead coordinator, a host that cannot prepare,
and etcd losing members.

The package's fleet (conftest.py); each test deploys versions of names of its own. The operator's
test comes first: its deploy is the fleet's first release, so rollback has nothing to go back to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fleet.cluster import Cluster
from tests.fleet.front import HAPROXY, Front, Recorder
from tests.fleet.harness import Fleet


def front_for(fleet: Fleet) -> Front:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    # The front checks each host's proxy port, as docs/fleet.md's config does: the proxy answers
    # /_changeover/health itself with the sync state its daemon's fleet agent tells it.
    f = Front(fleet.root, [(h.name, "127.0.0.1", h.port, h.port) for h in fleet.hosts])
    f.start()
    Fleet.wait(lambda: httpx.get(f"http://127.0.0.1:{f.port}/", timeout=1).status_code == 200, "the front serves")
    return f


def test_status_and_controls_from_an_operator_machine_with_only_the_config(fleet: Fleet, tmp_path: Path) -> None:
    op = tmp_path / "operator"
    op.mkdir()
    (op / "changeover.toml").write_text(fleet.hosts[0].config.read_text())
    fleet.releases("o1")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "changeover", *args, "-c", str(op / "changeover.toml")],
                              cwd=op, capture_output=True, text=True, timeout=120)

    out = cli("deploy", "o1", "--path", "releases/o1")
    assert out.returncode == 0 and "o1 finalised fleet-wide" in out.stderr, out.stderr
    st = json.loads(cli("status", "--json").stdout)
    assert st["local"] is None and set(st["hosts"]) == {"h1", "h2", "h3"}
    assert all(h["in_sync"] for h in st["hosts"].values())
    text = cli("status").stdout
    assert "h1" in text and "h3" in text and "o1" in text
    bad = cli("rollback")
    assert bad.returncode == 1 and "first release" in bad.stderr and "Traceback" not in bad.stderr


def test_deploy_manual_and_automatic_rollback_fleet_wide_fail_no_request(fleet: Fleet) -> None:
    first = fleet.deploy("v1")
    assert "v1 finalised fleet-wide" in first.stderr, first.stderr
    assert fleet.lives() == ["v1", "v1", "v1"]
    front = front_for(fleet)
    try:
        with Recorder("127.0.0.1", front.port) as load:
            load.wait_for(200)
            t0 = time.time()
            out = fleet.deploy("v2", host=1)            # from any host
            t_v2 = time.time()
            assert "v2 finalised fleet-wide" in out.stderr and "switch skew" in out.stderr, out.stderr
            for name in ("h1", "h2", "h3"):   # each host's steps were streamed back
                assert any(line.startswith(name) and "✓ start " in line for line in out.stderr.splitlines())
            assert fleet.lives() == ["v2", "v2", "v2"]
            load.wait_for(200)

            t1 = time.time()
            back = fleet.cli("rollback", "--reason", "by hand")
            t_back = time.time()
            assert "v1 is the fleet's release" in back.stderr, back.stderr
            assert fleet.lives() == ["v1", "v1", "v1"]
            load.wait_for(200)

            # v3 fails on h2 only once live: h2's own trigger rolls the whole fleet back.
            fleet.configure(monitor='observe = "30s"\nwindow = "3s"', extra='[env]\nFAULT_FILE = "fault.json"\n')
            path = fleet.releases("v3")
            t2 = time.time()
            bg = fleet.spawn("deploy", "v3", "--path", path, host=2)
            Fleet.wait(lambda: fleet.hosts[1].live_version() == "v3", "v3 live on h2", timeout=60)
            (fleet.hosts[1].root / "releases" / "v3" / "fault.json").write_text(json.dumps({"error_rate": 1.0}))
            _, err = bg.communicate(timeout=90)
            t_auto = time.time()
            assert bg.returncode != 0 and "rolled back fleet-wide" in err and "h2" in err, err
            Fleet.wait(lambda: fleet.lives() == ["v1", "v1", "v1"], "the fleet back on v1")
            load.wait_for(200)
            t_end = time.time()
    finally:
        front.stop()

    assert load.failed(but=("v3",)) == [], load.failed(but=("v3",))[:5]
    assert len(load.records) > 1000
    v2_window = [r.version for r in load.since(t_v2) if r.sent < t1]
    assert v2_window and set(v2_window) == {"v2"}, "no host served v1 after the switch"
    v1_window = [r.version for r in load.since(t_back) if r.sent < t2]
    assert v1_window and set(v1_window) == {"v1"}
    assert {r.version for r in load.since(t_auto) if r.sent < t_end} == {"v1"}
    assert {r.version for r in load.since(t0) if r.sent < t_v2} <= {"v1", "v2"}

    st = fleet.status()
    assert set(st["hosts"]) == {"h1", "h2", "h3"}
    assert all(h["in_sync"] and h["live"]["version"] == "v1" for h in st["hosts"].values())
    hist = json.loads(fleet.cli("history", "--json").stdout)
    assert [r["state"] for r in hist[:3]] == ["rolled_back", "rolled_back", "succeeded"]
    assert hist[0]["version"] == "v3" and "h2" in (hist[0]["reason"] or "")
    assert set(hist[2]["hosts"]) == {"h1", "h2", "h3"} and hist[2]["skew_ms"] is not None
    for h in fleet.hosts:
        code, body = h.health()
        assert code == 200 and body["in_sync"] is True
        assert httpx.get(f"http://127.0.0.1:{h.health_port}/other", timeout=2).status_code == 404


def test_second_deploy_names_the_holder_and_a_dead_coordinators_lock_expires(fleet: Fleet) -> None:
    fleet.deploy("l1")
    path = fleet.releases("l2")
    first = fleet.spawn("deploy", "l2", "--path", path, "--env", "FAULT_START_DELAY=20")
    Fleet.wait(lambda: fleet.status()["fleet"]["lock"] is not None, "the first deploy holds the lock")
    second = fleet.deploy("l3", check=False, host=1)
    assert second.returncode != 0, second.stderr
    assert f"pid {first.pid}" in second.stderr and "locked by" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr

    Fleet.wait(lambda: any((h.get("deployment") or {}).get("version") == "l2"
                           for h in fleet.status()["hosts"].values()), "the hosts prepare l2")
    os.killpg(first.pid, signal.SIGKILL)         # the coordinator dies mid-deploy
    first.wait(timeout=10)
    st = fleet.status()
    assert st["fleet"]["desired"]["action"] == "prepare" and st["fleet"]["desired"]["version"] == "l2"
    Fleet.wait(lambda: fleet.status()["fleet"]["lock"] is None, "the dead coordinator's lock expires", timeout=15)
    assert fleet.lives() == ["l1", "l1", "l1"]   # nothing users see changed

    third = fleet.deploy("l3")                   # settles l2 (aborted), then deploys
    assert "settling deployment" in third.stderr, third.stderr
    assert fleet.lives() == ["l3", "l3", "l3"]
    hist = json.loads(fleet.cli("history", "--json").stdout)
    assert [(r["version"], r["state"]) for r in hist[:2]] == [("l3", "succeeded"), ("l2", "aborted")]


def test_a_host_that_cannot_prepare_aborts_the_deploy_everywhere(fleet: Fleet) -> None:
    fleet.deploy("c1")
    for h in fleet.hosts[:2]:
        h.release("c2")                          # h3 lacks the release directory
    out = fleet.cli("deploy", "c2", "--path", "releases/c2", check=False)
    assert out.returncode == 1, out.stderr
    assert "aborted before the switch" in out.stderr and "h3" in out.stderr and "no such directory" in out.stderr
    assert "Traceback" not in out.stderr
    assert fleet.lives() == ["c1", "c1", "c1"]
    Fleet.wait(lambda: all(h.get("deployment") is None for h in fleet.status()["hosts"].values()),
               "no host keeps c2 prepared")


def test_one_etcd_member_down_deploys_go_on_two_down_they_are_refused_and_traffic_flows(
        fleet: Fleet, etcd: Cluster) -> None:
    fleet.deploy("q1")
    front = front_for(fleet)
    try:
        with Recorder("127.0.0.1", front.port) as load:
            etcd.kill(0)
            out = fleet.deploy("q2")
            assert "q2 finalised fleet-wide" in out.stderr, out.stderr
            etcd.kill(1)
            refused = fleet.deploy("q3", check=False)
            assert refused.returncode != 0 and "refused" in refused.stderr, refused.stderr
            assert "etcd" in refused.stderr and "Traceback" not in refused.stderr
            load.wait_for(300)
            assert fleet.lives() == ["q2", "q2", "q2"]
            for h in fleet.hosts:   # a member without quorum still answers reads: in sync
                assert h.health()[0] == 200
            t_end = time.time()
    finally:
        front.stop()
        for i in (0, 1):                   # quorum back for the tests after this one
            etcd.restart(i)
        etcd.wait_healthy()
    assert load.failed() == [], load.failed()[:5]
    assert load.since(t_end - 1), "traffic never stopped"
