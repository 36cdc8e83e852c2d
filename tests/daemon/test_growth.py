"""Long-lived hosts: the state prunes old deployments, events and releases (never what a slot or an
in-flight deployment needs), and daemon.log rotates."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover.errors import ConfigError
from changeover.retention import StateRetention
from changeover.state import PRUNE_EVERY, State
from tests.daemon.harness import Project


def counts(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("deployments", "steps", "events", "releases")}
    finally:
        db.close()


def history(st: State, n: int, release_id: int) -> None:
    for i in range(n):
        dep = st.begin_deployment("deploy", f"old{i}", release_id, None, "blue")
        st.end_step(st.begin_step(dep, "start blue"), "ok", "x" * 2000)   # check output, step details
        st.add_checks(dep, [{"name": "smoke", "ok": True, "detail": "y" * 2000}])
        st.transition_deployment(dep, "failed", "old")


def test_prune_keeps_slots_releases_and_the_in_flight_deployment(tmp_path: Path) -> None:
    st = State(tmp_path / "state.db")
    st.retention = StateRetention(keep_deployments=10, keep_events=100)
    live = st.add_release("live", "/x", ["app"], {})          # the oldest release runs live
    standby = st.add_release("standby", "/x", ["app"], {})
    st.transition_slot("blue", "starting", release_id=live.id)
    st.transition_slot("blue", "live")
    st.transition_slot("green", "starting", release_id=standby.id)
    st.transition_slot("green", "standby")
    in_flight = st.begin_deployment("deploy", "slow", standby.id, None, "green")   # oldest, still running
    for i in range(30):
        rel = st.add_release(f"r{i}", "/x", ["app"], {})
        history(st, 1, rel.id)
    for i in range(1000):
        st.event("instance.restarted", "blue", n=i)
    assert counts(tmp_path / "state.db")["events"] <= 100 + PRUNE_EVERY   # events prune as they are written
    st.prune()   # also done as each deployment begins
    c = counts(tmp_path / "state.db")
    # The newest 10 and the in-flight one (older than all of them), with their steps and checks.
    assert c["deployments"] == 11 and c["steps"] == 10 and c["events"] <= 100
    ids = {d.id for d in st.deployments(100)}
    assert in_flight in ids                               # never an in-flight deployment
    assert st.release(live.id) is not None and st.release(standby.id) is not None   # never a slot's release
    kept = {d.release_id for d in st.deployments(100)}
    assert c["releases"] == len(kept | {live.id, standby.id})
    st.close()


def test_state_and_logs_config() -> None:
    def load(tmp: Path, text: str) -> config_mod.Config:
        (tmp / "changeover.toml").write_text('[app]\ncommand = ["app"]\n' + text)
        return config_mod.load(tmp / "changeover.toml")

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        c = load(tmp, "")
        assert (c.retention.keep_deployments, c.retention.keep_events) == (500, 10000)
        assert (c.logs.max_bytes, c.logs.backups, c.logs.group) == (10 * 1024 * 1024, 5, None)
        c = load(tmp, "[state]\nkeep_deployments = 50\n[logs]\nmax_bytes = 0\nbackups = 2\ngroup = \"root\"\n")
        assert c.retention.keep_deployments == 50 and c.logs.max_bytes == 0 and c.logs.group == "root"
        with pytest.raises(ConfigError, match=r"state.keep_deployments: expected an integer >= 10"):
            load(tmp, "[state]\nkeep_deployments = 1\n")
        with pytest.raises(ConfigError, match=r"logs.group: expected the name of a group that exists"):
            load(tmp, "[logs]\ngroup = \"no-such-group-x\"\n")
        with pytest.raises(ConfigError, match=r"state.keep: "):
            load(tmp, "[state]\nkeep = 1\n")


def test_a_daemon_prunes_its_state_and_rotates_its_log(tmp_path: Path) -> None:
    p = Project(tmp_path)
    p.write(extra="\n[state]\nkeep_deployments = 10\nkeep_events = 100\n[logs]\nmax_bytes = 4096\nbackups = 1\n")
    st = State(tmp_path / ".changeover" / "state.db")   # years of history, written by earlier daemons
    rel = st.add_release("old", "/x", ["app"], {})
    history(st, 40, rel.id)
    for i in range(500):
        st.event("instance.restarted", "blue", n=i)
    st.close()
    (tmp_path / ".changeover" / "daemon.log").write_text("x" * 100_000 + "\n")
    try:
        p.start_daemon()
        p.deployed("v1")
        c = counts(tmp_path / ".changeover" / "state.db")
        assert c["deployments"] <= 11 and c["events"] <= 100 + PRUNE_EVERY and c["steps"] < 100, c
        logs = sorted(f.name for f in (tmp_path / ".changeover").glob("daemon.log*"))
        assert logs == ["daemon.log", "daemon.log.1"]
        assert (tmp_path / ".changeover" / "daemon.log").stat().st_size <= 4096 + 1024
    finally:
        p.teardown()
