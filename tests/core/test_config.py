"""changeover.toml loading: typed values, interpolation, and errors that name file, key and expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from changeover import config
from changeover.errors import ConfigError
from changeover.redact import redact_obj, redact_text

GOOD = """
[app]
command = ["node", "server.js", "--port", "$PORT"]
health_path = "/up"
instances = 2
ready_timeout = "45s"
stop_timeout = 5

[env]
NODE_ENV = "production"
DATABASE_URL = "${DATABASE_URL}"
REDIS_URL = "${REDIS_URL:-redis://127.0.0.1:6379/0}"
API_SECRET_TOKEN = "${TOKEN}"

[proxy]
listen = "127.0.0.1:8123"
drain_timeout = "500ms"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "changeover.toml"
    p.write_text(text)
    return p


def test_good_config_is_typed(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD), {"DATABASE_URL": "postgres://u:pw@db/app", "TOKEN": "t0k"})
    assert cfg.app.command == ("node", "server.js", "--port", "$PORT")
    assert cfg.app.instances == 2 and cfg.app.ready_timeout == 45.0 and cfg.app.stop_timeout == 5.0
    assert cfg.env["DATABASE_URL"] == "postgres://u:pw@db/app"
    assert cfg.env["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert cfg.proxy.port == 8123 and cfg.proxy.drain_timeout == 0.5
    assert cfg.state_dir == tmp_path / ".changeover"
    assert config.release_env(cfg, "v7")["API_VERSION"] == "v7"


def test_dotenv_beside_config_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# comment\nexport DATABASE_URL='sqlite:///app.db'\nTOKEN=from-file\n")
    cfg = config.load(write(tmp_path, GOOD), {"TOKEN": "from-env"})
    assert cfg.env["DATABASE_URL"] == "sqlite:///app.db"
    assert cfg.env["API_SECRET_TOKEN"] == "from-env"


def test_port_is_left_for_the_supervisor(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[app]\ncommand = ["app", "${PORT}", "$$HOME"]\n'), {})
    assert cfg.app.command == ("app", "${PORT}", "$HOME")


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("[app]\n", "app.command", "is required"),
    ('[app]\ncommand = "node server.js"\n', "app.command", "a list of strings"),
    ('[app]\ncommand = []\n', "app.command", "non-empty"),
    ('[app]\ncommand = ["x"]\ninstances = 0\n', "app.instances", ">= 1"),
    ('[app]\ncommand = ["x"]\nready_timeout = "soon"\n', "app.ready_timeout", "a duration"),
    ('[app]\ncommand = ["x"]\nhelth_path = "/h"\n', "app.helth_path", "did you mean 'health_path'"),
    ('[app]\ncommand = ["x"]\nhealth_path = "h"\n', "app.health_path", "starting with '/'"),
    ('[app]\ncommand = ["x"]\n[proxy]\nlisten = "8000"\n', "proxy.listen", "HOST:PORT"),
    ('[app]\ncommand = ["x"]\n[proxy]\ndrain_timeout = -1\n', "proxy.drain_timeout", "a duration"),
    ('[app]\ncommand = ["x"]\n[env]\nA = { b = 1 }\n', "env.A", "a string"),
    ('[app]\ncommand = ["x"]\n[env]\nDB = "${NOPE}"\n', "env.DB", "NOPE is not set"),
    ('[app]\ncommand = ["x"]\n[bogus]\n', "bogus", "unknown key"),
])
def test_errors_name_file_key_and_expectation(tmp_path: Path, text: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text), {})
    msg = str(e.value)
    assert "changeover.toml" in msg and key in msg and expected in msg, msg
    assert e.value.exit_code == 2


def test_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.load(write(tmp_path, "[app\n"), {})
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.toml", {})


def test_redaction() -> None:
    assert redact_text("postgres://app:s3cret@db:5432/x") == "postgres://app:***@db:5432/x"
    assert redact_obj({"API_TOKEN": "abc", "url": "redis://:pw@h/0", "n": 1}) == {
        "API_TOKEN": "***", "url": "redis://:***@h/0", "n": 1}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeover", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgres://u:hunter2@db/x",
                                           "TOKEN": "tok"})


def test_cli_config_check_redacts_and_errors_exit_2(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    ok = run_cli("config", "check", "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "hunter2" not in ok.stdout and "tok\"" not in ok.stdout and "***" in ok.stdout
    write(tmp_path, '[app]\ncommand = "node"\n')
    bad = run_cli("config", "check", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "app.command" in bad.stderr and "expected a list" in bad.stderr
    missing = run_cli("status", "-c", "nope.toml", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.toml" in missing.stderr and "Traceback" not in missing.stderr


def test_a_file_with_only_migrations_serves_the_migrate_commands(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0001_t.up.sql").write_text("CREATE TABLE t (id INTEGER PRIMARY KEY);\n")
    (tmp_path / "migrations" / "0001_t.down.sql").write_text("DROP TABLE t;\n")
    cfg = tmp_path / "changeover.toml"
    cfg.write_text(f'[migrations]\ndatabase = "sqlite:///{db}"\ndir = "migrations"\n')
    c = config.load(cfg)
    assert c.app is None
    with pytest.raises(ConfigError, match="app"):
        config.require_app(c)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "changeover", *args, "-c", str(cfg)], capture_output=True,
                              text=True, timeout=60)

    for args in (("migrate", "status"), ("migrate", "plan"), ("migrate", "lint"), ("migrate", "up")):
        p = run(*args)
        assert p.returncode == 0, (args, p.stderr)
    # What runs the app still needs [app], and says so without a traceback.
    serve = run("serve")
    assert serve.returncode == 2 and "app" in serve.stderr and "Traceback" not in serve.stderr


def test_the_longest_request_head_defaults_to_each_engines_own(tmp_path: Path) -> None:
    app = '[app]\ncommand = ["app"]\n'
    assert config.load(write(tmp_path, app), {}).proxy.max_header_bytes == 64 * 1024
    haproxy = config.load(write(tmp_path, app + '[proxy]\nengine = "haproxy"\n'), {})
    assert haproxy.proxy.max_header_bytes == 15 * 1024          # HAProxy's 16 KB buffers
    set_ = config.load(write(tmp_path, app + '[proxy]\nengine = "haproxy"\nmax_header_bytes = 65536\n'), {})
    assert set_.proxy.max_header_bytes == 65536
