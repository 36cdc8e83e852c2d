"""What each action's confirmation says, and the per-second series it charts (pure functions)."""

from __future__ import annotations

from typing import Any

from changeover.dashboard import actions, ops
from changeover.monitor.metrics import Recorder

LIVE = {"slot": "green", "version": "v2", "state": "serving"}
WARM = {"slot": "blue", "version": "v1", "state": "warm"}
HIST: list[dict[str, Any]] = [
    {"id": 2, "kind": "deploy", "version": "v2", "state": "succeeded",
     "steps": [{"kind": "switch", "state": "ok", "duration": 0.0012}]},
    {"id": 1, "kind": "deploy", "version": "v1", "state": "succeeded", "steps": []},
]
RELEASES = [{"version": "v1", "path": "/srv/r/v1", "exists": True}, {"version": "v0", "path": "/gone", "exists": False}]


def st(**kw: Any) -> dict[str, Any]:
    return {"live": LIVE, "standby": WARM, "metrics": {}, **kw}


def test_rollback_says_exactly_what_happens() -> None:
    p = actions.plan("rollback", st(), HIST, RELEASES)
    assert p.allowed and p.needs_reason
    assert p.text.startswith("Switch back to v1 on blue, warm: about 1.2 ms.")
    cold = actions.plan("rollback", st(standby=None), HIST, RELEASES)
    assert "Roll back to v1, cold" in cold.text and "started on blue" in cold.text
    observing = st(deployment={"id": 3, "kind": "deploy", "version": "v2", "phase": "observing", "slot": "green"})
    assert actions.plan("rollback", observing, HIST, RELEASES).text.startswith("Stop observing v2 and switch back "
                                                                               "to v1 on blue, warm")
    preparing = st(standby=None, deployment={"id": 3, "kind": "deploy", "version": "v3", "phase": "running",
                                             "slot": "blue", "step": "start blue"})
    assert "Abort the deploy of v3 (now at: start blue)" in actions.plan("rollback", preparing, HIST, RELEASES).text
    only = actions.plan("rollback", st(standby=None), HIST[:1], RELEASES)
    assert not only.allowed and "only one deployed" in only.text
    assert not actions.plan("rollback", {"live": None, "standby": None}, [], []).allowed


def test_promote_stop_standby_and_redeploy() -> None:
    observing = st(deployment={"id": 3, "kind": "deploy", "version": "v2", "phase": "observing", "slot": "green"},
                   metrics={"observing": {"remaining": 42.4, "elapsed": 10}})
    assert actions.plan("promote", observing, HIST, RELEASES).text.startswith("End the observation window of v2 "
                                                                              "now (42 s left)")
    assert not actions.plan("promote", st(), HIST, RELEASES).allowed
    assert actions.plan("stop_standby", st(), HIST, RELEASES).text.startswith("Drain and stop v1 on blue.")
    assert not actions.plan("stop_standby", observing, HIST, RELEASES).allowed
    r = actions.plan("redeploy", st(), HIST, RELEASES, "v1")
    assert r.allowed and r.path == "/srv/r/v1" and "Deploy v1 again from /srv/r/v1 into blue" in r.text
    assert "is gone" in actions.plan("redeploy", st(), HIST, RELEASES, "v0").text
    assert "live already" in actions.plan("redeploy", st(live={**LIVE, "version": "v1"}), HIST, RELEASES, "v1").text


def test_a_changed_situation_changes_the_fingerprint() -> None:
    a = actions.fingerprint(st())
    assert a != actions.fingerprint(st(standby=None))
    assert a != actions.fingerprint(st(live={**LIVE, "version": "v9"}))
    assert a == actions.fingerprint(st(metrics={"blue": {"rps": 3}}))   # traffic moves, the situation does not


class _State:
    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        return []


def test_series_has_one_point_per_second_with_percentiles() -> None:
    now = [1000.2]
    rec = Recorder(history=60, clock=lambda: now[0])
    rec.set_version("blue", "v1")
    now[0] = 1001.5
    for _ in range(10):
        rec.record("blue", 200, 0.002, False)
    now[0] = 1002.5
    rec.record("blue", 503, 0.004, False)
    out = ops.series(rec, _State(), 600)  # type: ignore[arg-type]
    pts = out["slots"]["blue"]["points"]
    assert [p[0] for p in pts] == [1000, 1001, 1002]          # never before the release started
    assert pts[1][1:3] == [10, 0] and pts[2][1:3] == [1, 1]
    assert 1.5 < pts[1][3] < 2.5 and pts[0][3] is None        # p50 in ms; no requests: no latency
    assert out["slots"]["blue"]["version"] == "v1"
