"""What a host decides from the desired state, and [fleet] config errors (no etcd needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover.errors import ConfigError
from changeover.fleet.config import peek
from changeover.fleet.model import Desired, Facts, decide

D = Desired(id="d1", action="prepare", version="v2", previous="v1", path="releases/v2")


def facts(live: str | None = "v1", active: str | None = None, phase: str | None = None, busy: bool = False) -> Facts:
    return Facts(live=live, active=active, phase=phase, busy=busy)


def test_each_desired_action_maps_to_one_verb_called_once() -> None:
    assert decide(D, facts(), set()) == "prepare"
    assert decide(D, facts(), {"d1:prepare"}) is None
    assert decide(D, facts(active="v2", phase="running", busy=True), set()) is None
    sw = D.but(action="switch")
    assert decide(sw, facts(active="v2", phase="prepared"), set()) == "switch"
    assert decide(sw, facts(live="v2"), {"d1:switch"}) is None              # in sync
    assert decide(sw, facts(), set()) == "converge"                          # back without the release
    assert decide(sw, facts(active="v2", phase="running", busy=True), set()) is None   # wait for prepare
    assert decide(D.but(action="promote"), facts(live="v2", active="v2", phase="observing"), set()) == "promote"
    # A daemon restarted after its switch carries the deployment on: the agent follows it once.
    assert decide(sw, facts(live="v2", active="v2", phase="observing"), set()) == "follow"
    assert decide(sw, facts(live="v2", active="v2", phase="observing"), {"d1:follow"}) is None
    assert decide(sw, facts(live="v2", active="v2", phase="observing"), {"d1:switch"}) is None
    assert decide(sw, facts(live="v2"), set()) == "follow"        # ... or it had finished it already
    assert decide(sw, facts(live="v2"), {"d1:converge"}) is None
    # Its own trigger rolled it back, then it restarted before telling the fleet: it reports that
    # (rolls the fleet back) once, and never converges to the release it judged bad.
    bad = Facts(live="v1", active=None, phase=None, busy=False, rolled_back="v2")
    assert decide(sw, bad, set()) == "report"
    assert decide(sw, bad, {"d1:report"}) is None
    assert decide(D.but(action="promote"), bad, set()) == "report"
    assert decide(D.but(action="abort"), facts(active="v2", phase="prepared"), set()) == "abort"
    assert decide(D.but(action="abort"), facts(), set()) is None
    rb = D.but(action="rollback")
    assert decide(rb, facts(live="v2", active="v2", phase="observing"), set()) == "abort"
    assert decide(rb, facts(live="v2"), set()) == "rollback"
    assert decide(rb, facts(live="v1"), set()) is None


def test_the_release_users_should_reach() -> None:
    assert D.live == "v1" and D.but(action="switch").live == "v2" and D.but(action="rollback").live == "v1"
    assert Desired.from_wire({"action": "nonsense"}) is None
    assert Desired.from_wire(D.wire()) == D


def write(tmp_path: Path, fleet: str) -> Path:
    f = tmp_path / "changeover.toml"
    f.write_text(f'[app]\ncommand = ["x"]\n[fleet]\n{fleet}\n')
    return f


@pytest.mark.parametrize(("fleet", "key", "expected"), [
    ('etcd = []', "fleet.etcd", "non-empty list"),
    ('etcd = ["10.0.0.5:2379"]', "fleet.etcd[0]", "etcd client URL"),
    ('etcd = ["http://a:2379"]\nname = "bad name"', "fleet.name", "host name"),
    ('etcd = ["http://a:2379"]\nmin_ready = 0', "fleet.min_ready", ">= 1"),
    ('etcd = ["http://a:2379"]\nlock_ttl = "1s"', "fleet.lock_ttl", "at least 2s"),
    ('etcd = ["http://a:2379"]\nhealth_listen = "nope"', "fleet.health_listen", "HOST:PORT"),
    ('etcd = ["http://a:2379"]\npassword = "x"', "fleet.password", "user as well"),
    ('etcd = ["http://a:2379"]\nca_file = "/nonexistent"', "fleet.ca_file", "readable file"),
    ('etcd = ["http://a:2379"]\nprefx = "x"', "fleet.prefx", "did you mean 'prefix'"),
])
def test_config_errors_name_the_key(tmp_path: Path, fleet: str, key: str, expected: str) -> None:
    f = write(tmp_path, fleet)
    with pytest.raises(ConfigError) as e:
        config_mod.load(f)
    assert e.value.key == key and expected in str(e.value) and str(f) in str(e.value)


def test_peek_reads_only_fleet_and_refuses_a_broken_file_that_declares_one(tmp_path: Path) -> None:
    f = write(tmp_path, 'etcd = ["http://a:2379"]\nname = "web-1"\nprefix = "shop"')
    cfg = peek(f)
    assert cfg is not None and cfg.name == "web-1" and cfg.root == "/changeover/shop/"
    f.write_text('[app]\ncommand = ["x"]\n')
    assert peek(f) is None
    f.write_text('[app\n[fleet]\netcd = ["http://a:2379"]\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        peek(f)
