"""`changeover check pre|smoke|flows` through typer's CliRunner, against real services."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from changeover.checks.cli import app
from changeover.errors import CheckFailed, ConfigError, UsageError

runner = CliRunner()


def write(tmp_path: Path, body: str, listen: str = "127.0.0.1:1") -> Path:
    f = tmp_path / "changeover.toml"
    f.write_text(f'[app]\ncommand = ["python3", "app.py"]\n[proxy]\nlisten = "{listen}"\n' + body)
    return f


def test_pre_json_passes_and_skips_endpoints_without_proxy(tmp_path: Path, pg_url: str, redis_url: str,
                                                          closed_port: int) -> None:
    f = write(tmp_path, f"""
[env]
DATABASE_URL = "{pg_url}"
REDIS_URL = "{redis_url}"
[[checks.pre.endpoints]]
path = "/health"
""", listen=f"127.0.0.1:{closed_port}")
    res = runner.invoke(app, ["pre", "-c", str(f), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] and doc["summary"] == "3 checks passed"
    kinds = {r["name"]: r for r in doc["results"]}
    assert kinds["endpoints"]["skipped"] and "nothing is live yet" in kinds["endpoints"]["detail"]


def test_pre_fails_with_table_and_check_failed(tmp_path: Path, pg_url: str, closed_port: int,
                                               start_app: Callable[..., str]) -> None:
    live = start_app()
    f = write(tmp_path, f"""
[env]
DATABASE_URL = "{pg_url}"
REDIS_URL = "redis://:pw-in-url@127.0.0.1:{closed_port}/0"
[[checks.pre.endpoints]]
path = "/health"
""", listen=live.removeprefix("http://"))
    res = runner.invoke(app, ["pre", "-c", str(f)])
    assert isinstance(res.exception, CheckFailed)
    assert str(res.exception) == "1 of 3 checks failed: redis"
    assert "endpoint GET /health" in res.output and "FAIL" in res.output
    assert "pw-in-url" not in res.output


def test_smoke_with_version_and_url(tmp_path: Path, start_app: Callable[..., str]) -> None:
    good, wrong = start_app(API_VERSION="v7"), start_app(API_VERSION="v7", FAULT_VERSION="v6")
    f = write(tmp_path, """
[env]
API_VERSION = "v7"
[checks.version]
[[checks.smoke]]
name = "home"
path = "/"
expect.contains = "hello from v7"
""")
    res = runner.invoke(app, ["smoke", "-c", str(f), "--url", good, "--json"])
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.output)["results"]] == ["version", "smoke home"]
    res = runner.invoke(app, ["smoke", "-c", str(f), "--url", wrong, "--json"])
    assert isinstance(res.exception, CheckFailed)
    doc = json.loads(res.output)
    assert not doc["ok"] and doc["summary"] == "2 of 2 checks failed: version, smoke home"


def test_flows_default_to_the_proxy_address(tmp_path: Path, start_app: Callable[..., str]) -> None:
    url = start_app()
    f = write(tmp_path, """
[[checks.flow]]
name = "sign in and look"
[[checks.flow.steps]]
method = "POST"
path = "/login"
json = { user = "cli" }
[[checks.flow.steps]]
path = "/me"
expect.json = { user = "cli" }
""", listen=url.removeprefix("http://"))
    res = runner.invoke(app, ["flows", "-c", str(f)])
    assert res.exit_code == 0, res.output
    assert "flow sign in and look" in res.output and "1 check passed" in res.output


def test_nothing_configured_and_bad_config(tmp_path: Path) -> None:
    f = write(tmp_path, "")
    res = runner.invoke(app, ["flows", "-c", str(f)])
    assert isinstance(res.exception, UsageError) and "no [[checks.flow]]" in str(res.exception)
    f = write(tmp_path, "[[checks.smoke]]\npath = '/'\nexpect = { status = 'ok' }")
    res = runner.invoke(app, ["smoke", "-c", str(f)])
    assert isinstance(res.exception, ConfigError)
    assert "checks.smoke[0].expect.status" in str(res.exception)
    res = runner.invoke(app, ["pre", "-c", str(tmp_path / "missing.toml")])
    assert isinstance(res.exception, ConfigError) and "no such file" in str(res.exception)
