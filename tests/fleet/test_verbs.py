"""The fleet's verbs and faults on the package's fleet (three real daemons with the example app, a
real three-member etcd, real PostgreSQL): min_ready with a host left out that retries converging with
backoff, the fleet's figures on /metrics, promote, abort of a prepared release, standby expiry,
migrations run once, and the coordinator SIGKILLed after the barrier, mid-switch and during
observation. Each test rewrites the hosts' config it needs (a daemon reads it for every deploy)
and deploys versions of its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from changeover.state import State
from tests.fleet.harness import Fleet

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def metrics(fleet: Fleet, host: int) -> str:
    port = fleet.metrics_ports[fleet.hosts[host].name]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text (labels matched as given)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def hosts(fleet: Fleet) -> dict[str, Any]:
    return dict(fleet.status()["hosts"])


def phases(fleet: Fleet, version: str) -> list[str | None]:
    return [(h.get("deployment") or {}).get("phase") if (h.get("deployment") or {}).get("version") == version
            else None for h in hosts(fleet).values()]


def kill(p: subprocess.Popen[str]) -> str:
    """SIGKILL the coordinator; what it had printed."""
    os.killpg(p.pid, signal.SIGKILL)
    return p.communicate(timeout=30)[1]


def restart(fleet: Fleet, i: int, env: dict[str, str] | None = None) -> None:
    """SIGKILL one host's daemon (its proxy worker and app instances keep running) and start it again."""
    h = fleet.hosts[i]
    assert h.daemon is not None
    os.kill(h.daemon.pid, signal.SIGKILL)
    h.daemon.wait(timeout=10)
    h.spawn_daemon(env)
    h.wait_daemon()
    assert h.daemon is not None
    pid = h.daemon.pid
    Fleet.wait(lambda: hosts(fleet)[h.name]["pid"] == pid, f"{h.name} registered again")


def served(fleet: Fleet, i: int) -> str:
    """The release a host's own proxy answers with."""
    h = fleet.hosts[i]
    return str(httpx.get(f"http://127.0.0.1:{h.port}/", timeout=2).headers.get("x-version", "?"))


def test_hosts_flipping_on_the_one_write_never_report_themselves_out_of_sync(fleet: Fleet) -> None:
    """Between the switch write and its own flip a host serves the release the fleet wanted a moment
    ago; were it reported lagging then, every host would answer 503 at once and a load balancer
    checking in that moment would take the whole fleet out."""
    if None in fleet.lives():
        fleet.deploy("n0")               # something to roll back to
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=2) as c:
            while not stop.wait(0.003):     # a lagging host would answer 503 for ~10-30 ms
                for h in fleet.hosts:
                    seen.append((h.name, c.get(f"http://127.0.0.1:{h.health_port}/_changeover/health").status_code))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fleet.deploy("n1")
        fleet.cli("rollback", "--reason", "flip back")
    finally:
        stop.set()
        t.join(timeout=10)
    assert len(seen) > 100
    assert [s for s in seen if s[1] != 200] == []


def test_a_host_daemon_killed_mid_switch_carries_on_and_reports_to_the_fleet(fleet: Fleet) -> None:
    restart(fleet, 0, {"CHANGEOVER_TEST_STEP_DELAY": "switch:60"})   # h1 holds its switch step after the flip
    try:
        bg = fleet.spawn("deploy", "r1", "--path", fleet.releases("r1"), host=1)
        Fleet.wait(lambda: served(fleet, 0) == "r1", "h1's proxy serves r1", timeout=60)
    finally:
        restart(fleet, 0)           # killed inside its switch step: it resumes the deployment
    _, err = bg.communicate(timeout=90)
    assert bg.returncode == 0 and "r1 finalised fleet-wide" in err, err
    assert "h1 has not switched" not in err, err
    assert fleet.lives() == ["r1", "r1", "r1"]
    rec = fleet.history()[0]
    assert rec["version"] == "r1" and rec["state"] == "succeeded"
    assert (rec["hosts"]["h1"].get("switch") or {}).get("state") == "succeeded", (err, rec)   # by h1's new daemon


def test_min_ready_leaves_a_host_out_that_retries_converging_with_backoff_and_metrics_show_the_fleet(
        fleet: Fleet) -> None:
    fleet.configure(fleet_extra="min_ready = 2")
    was = fleet.lives()[2]
    for h in fleet.hosts[:2]:
        h.release("m1")                               # h3 lacks the release
    out = fleet.cli("deploy", "m1", "--path", "releases/m1")
    assert "h3 is not prepared" in out.stderr and "m1 finalised fleet-wide" in out.stderr, out.stderr
    assert fleet.lives() == ["m1", "m1", was]

    try:
        # h3 converges on its own, fails (no release there), and tries again with backoff.
        Fleet.wait(lambda: (hosts(fleet)["h3"].get("retry") or {}).get("attempt", 0) >= 2, "h3 retried converging")
        h3 = hosts(fleet)["h3"]
        assert h3["in_sync"] is False and "no such directory" in h3["retry"]["error"], h3
        assert "converging to m1 failed" in h3["why"] and "next try in" in h3["why"], h3["why"]
        assert h3["retry"]["delay"] > 1.0                 # the backoff grew
        assert fleet.hosts[2].health()[0] == 503

        def figures() -> bool:   # the hosts' records reach each /metrics within a heartbeat or two
            m = metrics(fleet, 0)
            return (sample(m, "changeover_fleet_in_sync", host="h1") == 1.0
                    and sample(m, "changeover_fleet_hosts", state="in_sync") == 2.0
                    and sample(m, "changeover_fleet_hosts", state="out_of_sync") == 1.0
                    and sample(m, "changeover_fleet_host_in_sync", host="h3") == 0.0)

        Fleet.wait(figures, "/metrics: h1 and h2 in sync, h3 out", timeout=15)
        m = metrics(fleet, 0)
        assert sample(m, "changeover_fleet_heartbeat_age_seconds", host="h3") is not None
        assert sample(m, "changeover_fleet_desired", action="switch", release="m1") == 1.0
        assert (sample(m, "changeover_fleet_switch_skew_seconds") or -1) >= 0.0
        assert (sample(metrics(fleet, 2), "changeover_fleet_converge_failures", host="h3") or 0) >= 2
        assert sample(m, "changeover_live_slot") is not None     # the daemon's own figures are still there
        assert "converging to m1 failed" in fleet.cli("status").stdout
    finally:
        fleet.hosts[2].release("m1")                  # the release arrives: the next try converges
    Fleet.wait(lambda: all(h["in_sync"] for h in hosts(fleet).values()), "h3 converged", timeout=60)
    assert fleet.lives() == ["m1", "m1", "m1"] and hosts(fleet)["h3"]["retry"] is None
    assert fleet.hosts[2].health()[0] == 200
    Fleet.wait(lambda: sample(metrics(fleet, 0), "changeover_fleet_hosts", state="in_sync") == 3.0,
               "/metrics: three hosts in sync")


def test_promote_ends_the_observation_window_fleet_wide(fleet: Fleet) -> None:
    fleet.configure(monitor='observe = "120s"\nwindow = "3s"')
    bg = fleet.spawn("deploy", "p1", "--path", fleet.releases("p1"))
    Fleet.wait(lambda: phases(fleet, "p1") == ["observing"] * 3, "every host observes p1", timeout=60)
    out = fleet.cli("promote", host=2)
    assert "p1 is the fleet's release" in out.stderr, out.stderr
    _, err = bg.communicate(timeout=60)
    assert bg.returncode == 0 and "p1 finalised fleet-wide" in err, err
    assert fleet.lives() == ["p1", "p1", "p1"]
    rec = fleet.history()[0]
    assert rec["version"] == "p1" and rec["state"] == "succeeded"
    assert {(r.get("switch") or {}).get("state") for r in rec["hosts"].values()} == {"succeeded"}
    assert all(r.get("promote") for r in rec["hosts"].values()), rec["hosts"]


def test_abort_of_a_prepared_fleet_release_unwinds_it_everywhere(fleet: Fleet) -> None:
    before = fleet.lives()
    fleet.deploy("a1", "--no-switch")
    st = fleet.status()
    assert st["fleet"]["desired"]["held"] and "prepared fleet-wide" in st["fleet"]["note"]
    assert phases(fleet, "a1") == ["prepared"] * 3
    refused = fleet.deploy("a2", check=False)
    assert refused.returncode != 0 and "changeover abort" in refused.stderr, refused.stderr
    out = fleet.cli("abort", host=1)
    assert "the fleet's release" in out.stderr, out.stderr
    Fleet.wait(lambda: phases(fleet, "a1") == [None] * 3, "no host keeps a1")
    assert fleet.lives() == before
    assert fleet.history()[0]["state"] == "aborted"


def test_standby_expiry_is_each_hosts_own_fleet_wide(fleet: Fleet) -> None:
    fleet.configure(monitor='observe = "0s"\nkeep_standby = "1s"')
    fleet.deploy("e1")
    Fleet.wait(lambda: all(h.get("standby") is None for h in hosts(fleet).values()), "every standby retired")
    assert fleet.lives() == ["e1", "e1", "e1"]
    assert all(h["in_sync"] for h in hosts(fleet).values())


@pytest.fixture
def pg_url() -> Iterator[str]:
    import psycopg

    name = f"co_fleet_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {e}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_run_once_for_the_fleet(fleet: Fleet, pg_url: str) -> None:
    import psycopg

    for h in fleet.hosts:
        mig = Path(h.root) / "migrations"
        mig.mkdir(exist_ok=True)
        (mig / "0001_items.up.sql").write_text("CREATE TABLE items (id bigint PRIMARY KEY);\n")
        (mig / "0001_items.down.sql").write_text("DROP TABLE items;\n")
    try:
        fleet.configure(extra=f'[migrations]\ndatabase = "{pg_url}"\ndir = "migrations"\n')
        out = fleet.deploy("g1")
        assert "migrations (expand), once for the fleet: 1 applied" in out.stderr, out.stderr
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT version, state FROM changeover_migrations").fetchall()
        assert len(rows) == 1, rows
        assert fleet.lives() == ["g1", "g1", "g1"]
    finally:
        for h in fleet.hosts:
            for f in (Path(h.root) / "migrations").glob("*"):
                f.unlink()
            (Path(h.root) / "migrations").rmdir()
        fleet.configure()


def test_the_coordinator_killed_after_the_barrier_mid_switch_and_in_observation(fleet: Fleet) -> None:
    # After the barrier (every host prepared), before the switch: nothing users see changed.
    before = fleet.lives()
    bg = fleet.spawn("deploy", "k1", "--path", fleet.releases("k1"), env={"CHANGEOVER_TEST_FLEET_PAUSE": "barrier:60"})
    Fleet.wait(lambda: phases(fleet, "k1") == ["prepared"] * 3, "every host prepared k1", timeout=60)
    kill(bg)
    st = fleet.status()
    assert st["fleet"]["desired"]["action"] == "prepare" and st["fleet"]["desired"]["version"] == "k1"
    Fleet.wait(lambda: fleet.status()["fleet"]["lock"] is None, "the dead coordinator's lock expires", timeout=20)
    note = fleet.status()["fleet"]["note"]
    assert "left before its switch" in note and "next deploy aborts it" in note, note
    assert fleet.lives() == before
    # The next deploy settles it (aborted) and goes on; this one dies right after its switch write.
    bg = fleet.spawn("deploy", "k2", "--path", fleet.releases("k2"), env={"CHANGEOVER_TEST_FLEET_PAUSE": "switch:60"})
    Fleet.wait(lambda: fleet.lives() == ["k2", "k2", "k2"], "every host switches on the one write", timeout=60)
    kill(bg)
    Fleet.wait(lambda: fleet.status()["fleet"]["lock"] is None, "the lock expires", timeout=20)
    Fleet.wait(lambda: all(h["in_sync"] and h.get("deployment") is None for h in hosts(fleet).values()),
               "every host finalised k2 on its own")
    note = fleet.status()["fleet"]["note"]
    assert "k2 is live" in note and "the next deploy records it" in note, note
    hist = fleet.history()
    assert [(r["version"], r["state"]) for r in hist[:2]] == [("k2", "preparing"), ("k1", "aborted")]

    # In observation: the hosts keep judging; the next deploy is refused until promote/rollback.
    fleet.configure(monitor='observe = "120s"\nwindow = "3s"')
    bg = fleet.spawn("deploy", "k3", "--path", fleet.releases("k3"))
    Fleet.wait(lambda: phases(fleet, "k3") == ["observing"] * 3, "every host observes k3", timeout=60)
    printed = kill(bg)
    assert "recorded as succeeded" in printed, printed     # k2, settled by this deploy
    Fleet.wait(lambda: fleet.status()["fleet"]["lock"] is None, "the lock expires", timeout=20)
    note = fleet.status()["fleet"]["note"]
    assert "observation window on h1, h2, h3 without a coordinator" in note, note
    refused = fleet.deploy("k4", check=False)
    assert refused.returncode != 0 and "changeover promote" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    back = fleet.cli("rollback", "--reason", "coordinator died")
    assert "k2 is the fleet's release" in back.stderr, back.stderr
    assert fleet.lives() == ["k2", "k2", "k2"]
    fleet.configure()
    out = fleet.deploy("k4")
    assert "k4 finalised fleet-wide" in out.stderr, out.stderr
    hist = fleet.history()
    assert [(r["version"], r["state"]) for r in hist[:4]] == [
        ("k4", "succeeded"), ("k3", "rolled_back"), ("k2", "succeeded"), ("k1", "aborted")]


def test_a_host_rolled_back_by_its_own_trigger_and_restarted_before_telling_the_fleet_rolls_it_back(
        fleet: Fleet) -> None:
    """In observation without a coordinator (it died), a host's own trigger rolls it back and its
    daemon is killed before it tells the fleet: back, it rolls the fleet back with one write and
    never serves the release it judged bad again."""
    before = fleet.deploy("b0")
    assert "b0 finalised fleet-wide" in before.stderr, before.stderr
    fleet.configure(monitor='observe = "60s"\nwindow = "3s"', extra='[env]\nFAULT_FILE = "fault.json"\n')
    restart(fleet, 1, {"CHANGEOVER_TEST_FLEET_PAUSE": "rolled_back:60"})
    bg = fleet.spawn("deploy", "b1", "--path", fleet.releases("b1"))
    try:
        Fleet.wait(lambda: phases(fleet, "b1") == ["observing"] * 3, "every host observes b1", timeout=60)
        kill(bg)
        (fleet.hosts[1].root / "releases" / "b1" / "fault.json").write_text(json.dumps({"error_rate": 1.0}))
        Fleet.wait(lambda: served(fleet, 1) == "b0", "h2's own trigger rolled it back", timeout=30)
        assert fleet.status()["fleet"]["desired"]["action"] == "switch"    # the fleet has not heard
    finally:
        restart(fleet, 1)
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                seen.append(served(fleet, 1))
            stop.wait(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        Fleet.wait(lambda: fleet.lives() == ["b0", "b0", "b0"], "the fleet back on b0", timeout=60)
    finally:
        stop.set()
        t.join(timeout=5)
    assert seen and "b1" not in seen, "h2 converged to the release it had judged bad"
    d = fleet.status()["fleet"]["desired"]
    assert d["action"] == "rollback" and d["fired_by"] == "h2" and d["version"] == "b1", d
    local = [r for r in State(fleet.hosts[1].root / ".changeover" / "state.db", readonly=True).history(10)
             if r["version"] == "b1"]
    assert [r["state"] for r in local] == ["rolled_back"], local     # deployed once, never converged to
    Fleet.wait(lambda: fleet.status()["fleet"]["lock"] is None, "the dead coordinator's lock expires", timeout=20)
    fleet.configure()
    assert "b2 finalised fleet-wide" in fleet.deploy("b2").stderr     # the next deploy settles it
