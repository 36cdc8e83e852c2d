"""[checks] config: the documented example loads; every mistake names the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover.checks.config import DEFAULT_TIMEOUT, ChecksConfig
from changeover.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "checks.md"
APP = '[app]\ncommand = ["python3", "app.py"]\n'


def load(tmp_path: Path, checks_toml: str) -> ChecksConfig:
    f = tmp_path / "changeover.toml"
    f.write_text(APP + checks_toml)
    return config_mod.load(f, environ={}).checks


def error(tmp_path: Path, checks_toml: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, checks_toml)
    return str(e.value)


def doc_example() -> str:
    text = DOC.read_text()
    return re.search(r"## Full example\s+```toml\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]


def test_documented_example_loads(tmp_path: Path) -> None:
    c = load(tmp_path, doc_example())
    assert c.timeout == 10.0 and c.pre.timeout == 5.0
    assert c.pre.database == "auto" and c.pre.redis == "required"
    assert [e.name for e in c.pre.endpoints] == ["GET /health", "catalogue"]
    assert c.pre.endpoints[1].expect.max_latency == 0.5
    pay, worker = c.pre.services
    assert pay.tcp == ("payments.internal", 443) and pay.critical and pay.timeout == 5.0
    assert worker.command == ("systemctl", "is-active", "--quiet", "shop-worker") and worker.timeout == 3.0
    assert [i.name for i in c.pre.integrity] == ["no orphan order lines", "no negative totals"]
    assert c.pre.connections is not None and c.pre.connections.green_pool == 20
    assert c.version is not None and c.version.field == "version" and c.version.path is None
    assert [s.name for s in c.smoke] == ["home page", "catalogue", "echo"]
    assert c.smoke[0].expect.contains == ("hello",) and c.smoke[2].json == {"ping": "pong"}
    [flow] = c.flows
    assert [s.name for s in flow.steps] == ["sign in", "add to cart", "read the cart back"]
    assert flow.steps[0].capture == {"user": "user"}
    assert c.session is not None and c.session.flow is flow and c.session.verify.path == "/me"


def test_defaults(tmp_path: Path) -> None:
    c = load(tmp_path, "")
    assert c == ChecksConfig()
    assert c.timeout == DEFAULT_TIMEOUT and c.version is None and c.session is None
    c = load(tmp_path, '[checks.pre]\ndatabase = true\nredis = false\n[checks.version]\n'
                       '[[checks.flow]]\nname = "f"\n[[checks.flow.steps]]\npath = "/a"\n')
    assert c.pre.database == "required" and c.pre.redis == "off"
    assert c.version is not None and c.version.field == "version"
    assert c.flows[0].steps[0].name == "step 1: GET /a"


@pytest.mark.parametrize(("toml", "where", "what"), [
    ("[checks]\ntimout = '5s'", "checks.timout", "unknown key (did you mean 'timeout'?)"),
    ("[checks]\ntimeout = 'soon'", "checks.timeout", "a duration like"),
    ("[checks]\ntimeout = 0", "checks.timeout", "a duration > 0"),
    ("[[checks.smoke]]\npath = '/'\ntimeout = '0s'", "checks.smoke[0].timeout", "a duration > 0"),
    ("[checks.pre]\ndatabase = 'maybe'", "checks.pre.database", "true, false, or one of 'auto'"),
    ("[[checks.pre.services]]\nname = 'x'", "checks.pre.services[0].tcp", "exactly one of tcp"),
    ("[[checks.pre.services]]\ntcp = 'db:5432'\ncommand = ['true']", "checks.pre.services[0].tcp",
     "exactly one of"),
    ("[[checks.pre.services]]\ntcp = 'nohost'", "checks.pre.services[0].tcp", "HOST:PORT"),
    ("[[checks.pre.services]]\ncommand = []", "checks.pre.services[0].command", "non-empty list"),
    ("[[checks.pre.services]]\ntcp = 'a:1'\ntimout = 1", "checks.pre.services[0].timout", "did you mean"),
    ("[[checks.pre.integrity]]\nname = 'x'", "checks.pre.integrity[0].sql", "is required"),
    ("[[checks.pre.integrity]]\nsql = '  '", "checks.pre.integrity[0].sql", "non-empty SQL"),
    ("[checks.pre.connections]\nheadroom = 2", "checks.pre.connections.green_pool", "is required"),
    ("[checks.pre.connections]\ngreen_pool = 0", "checks.pre.connections.green_pool", ">= 1"),
    ("[[checks.smoke]]\nmethod = 'GET'", "checks.smoke[0].path", "is required"),
    ("[[checks.smoke]]\npath = 'health'", "checks.smoke[0].path", "starting with '/'"),
    ("[[checks.smoke]]\npath = '/'\nmethod = 'FETCH'", "checks.smoke[0].method", "one of GET"),
    ("[[checks.smoke]]\npath = '/'\nexpect.status = 999", "checks.smoke[0].expect.status", "100-599"),
    ("[[checks.smoke]]\npath = '/'\nexpect.statsu = 200", "checks.smoke[0].expect.statsu", "did you mean"),
    ("[[checks.smoke]]\npath = '/'\nexpect.max_latency = 'fast'", "checks.smoke[0].expect.max_latency",
     "a duration"),
    ("[[checks.smoke]]\npath = '/'\nbody = 'x'\njson = {a = 1}", "checks.smoke[0].json", "either body or json"),
    ("[[checks.smoke]]\npath = '/'\njson = {at = 1979-05-27}", "checks.smoke[0].json.at", "JSON-compatible"),
    ("[[checks.smoke]]\npath = '/{{id}}'", "checks.smoke[0].path", "captured: none"),
    ("[[checks.smoke]]\npath = '/'\n[[checks.smoke]]\npath = '/'", "checks.smoke[1].name", "not used by"),
    ("[[checks.flow]]\nname = 'f'", "checks.flow[0].steps", "at least one step"),
    ("[[checks.flow]]\nname = 'f'\n[[checks.flow.steps]]\npath = '/'\njson = {id = '{{cart_id}}'}\n"
     "[[checks.flow.steps]]\npath = '/'\ncapture = {cart_id = 'id'}",
     "checks.flow[0].steps[0].json", "{{cart_id}}"),
    ("[[checks.flow]]\nname = 'f'\n[[checks.flow.steps]]\npath = '/'\ncapture = {'bad-name' = 'id'}",
     "checks.flow[0].steps[0].capture.bad-name", "variable name"),
    ("[checks.session]\nflow = 'login'", "checks.session.flow", "flows: none defined"),
    ("[[checks.flow]]\nname = 'f'\n[[checks.flow.steps]]\npath = '/'\n[checks.session]\nflow = 'f'",
     "checks.session.verify.path", "is required"),
    ("[checks.version]\nfield = 'a..b'", "checks.version.field", "dotted JSON path"),
])
def test_errors_name_file_and_key(tmp_path: Path, toml: str, where: str, what: str) -> None:
    msg = error(tmp_path, toml)
    assert msg.startswith(f"{tmp_path / 'changeover.toml'}: {where}: "), msg
    assert what in msg, msg
