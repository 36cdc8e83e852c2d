"""`changeover init`: what each kind of project becomes, never overwriting, `--example node`, and
the lookup of the default changeover.toml (walking up, CHANGEOVER_CONFIG)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from changeover import config as config_mod
from changeover import init
from changeover.errors import UsageError


def scaffold(root: Path) -> config_mod.Config:
    init.init(root)
    env = {"DATABASE_URL": "postgresql://x@127.0.0.1/x", "REDIS_URL": "redis://127.0.0.1:6379/0",
           "SESSION_SECRET": "s", "PATH": os.environ.get("PATH", "")}
    return config_mod.load(root / "changeover.toml", environ=env)   # what init writes is valid


def test_node_start_script_lockfile_and_services(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(json.dumps({
        "scripts": {"start": "node server.js"},
        "dependencies": {"express": "^5", "pg": "^8", "ioredis": "^5", "express-session": "^1"}}))
    (tmp_path / "package-lock.json").write_text("{}")
    cfg = scaffold(tmp_path)
    assert cfg.app is not None and cfg.app.command == ("node", "server.js")
    assert cfg.app.build.argv[:2] == ("npm", "ci") and cfg.app.health_path == "/health"
    assert set(cfg.env) == {"NODE_ENV", "DATABASE_URL", "REDIS_URL", "SESSION_SECRET"}
    assert cfg.migrations.dir == "{release}/migrations" and (tmp_path / "migrations").is_dir()
    example = (tmp_path / ".env.example").read_text()
    assert "DATABASE_URL=" in example and "REDIS_URL=" in example and "SESSION_SECRET=" in example


def test_node_shell_start_script_and_no_lockfile(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(json.dumps({"scripts": {"start": "node dist/a.js && echo"}}))
    p = init.detect(tmp_path)
    assert p.command == ["sh", "-c", "node dist/a.js && echo"]
    assert p.build[:2] == ["npm", "install"] and any("lockfile" in n for n in p.notes)
    (tmp_path / "package.json").write_text(json.dumps({"main": "app.js"}))
    (tmp_path / "yarn.lock").write_text("")
    p = init.detect(tmp_path)
    assert p.command == ["node", "app.js"] and p.build[0] == "yarn"


def test_python_gunicorn_uvicorn_and_django(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("flask==3.0\ngunicorn>=21  # server\npsycopg[binary]\n")
    (tmp_path / "app.py").write_text("")
    cfg = scaffold(tmp_path)
    assert cfg.app is not None and cfg.app.command == (".venv/bin/gunicorn", "app:app", "--bind", "127.0.0.1:$PORT")
    assert "requirements.txt" in cfg.app.build.argv[-1] and "DATABASE_URL" in cfg.env

    api = tmp_path / "api"
    api.mkdir()
    (api / "pyproject.toml").write_text('[project]\nname = "a"\ndependencies = ["fastapi", "uvicorn[standard]"]\n')
    (api / "main.py").write_text("")
    p = init.detect(api)
    assert p.command == [".venv/bin/uvicorn", "main:app", "--host", "127.0.0.1", "--port", "$PORT"]
    assert p.build[-1].endswith("pip install .")

    site = tmp_path / "site"
    (site / "shop").mkdir(parents=True)
    (site / "manage.py").write_text("")
    (site / "shop" / "wsgi.py").write_text("")
    (site / "requirements.txt").write_text("Django>=5\ngunicorn\n")
    p = init.detect(site)
    assert p.kind == "Django" and p.command[1] == "shop.wsgi" and p.env["DJANGO_SETTINGS_MODULE"] == "shop.settings"
    (site / "requirements.txt").write_text("Django>=5\n")
    p = init.detect(site)
    assert "runserver" in p.command and any("gunicorn" in n for n in p.notes)


def test_procfile_wins_for_the_command(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("release: ./migrate\nweb: bin/server --port $PORT\n")
    assert init.detect(tmp_path).command == ["bin/server", "--port", "$PORT"]
    (tmp_path / "package.json").write_text(json.dumps({"scripts": {"start": "node a.js"}}))
    p = init.detect(tmp_path)
    assert p.command == ["bin/server", "--port", "$PORT"] and p.build[0] == "npm" and "Procfile" in p.kind


def test_go_module_and_binary(tmp_path: Path) -> None:
    (tmp_path / "go.mod").write_text("module shop\n")
    p = init.detect(tmp_path)
    assert p.command == ["./app"] and p.build == ["go", "build", "-o", "app", "."]
    binary = tmp_path / "bin"
    binary.mkdir()
    exe = binary / "shopd"
    exe.write_bytes(b"\x7fELF" + b"\0" * 60)
    exe.chmod(0o755)
    (binary / "README").write_text("not a binary")
    assert init.detect(binary).command == ["./shopd"]


def test_nothing_recognised_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(UsageError, match=r"no package\.json, pyproject\.toml"):
        init.init(tmp_path)
    (tmp_path / "package.json").write_text("{broken")
    with pytest.raises(UsageError, match="not valid JSON"):
        init.detect(tmp_path)


def test_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(json.dumps({"scripts": {"start": "node s.js"}}))
    (tmp_path / "changeover.toml").write_text("# mine\n")
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "0001_a.up.sql").write_text("SELECT 1;\n")
    res = init.init(tmp_path)
    assert (tmp_path / "changeover.toml").read_text() == "# mine\n"
    assert res.kept == ["changeover.toml", "migrations/"] and res.written == [".env.example"]
    assert not (tmp_path / "migrations" / ".gitkeep").exists()
    again = init.init(tmp_path)
    assert again.written == [] and ".env.example" in again.kept


def test_cli_prints_the_next_three_commands_and_copies_the_example(tmp_path: Path) -> None:
    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "changeover", "init", *args], cwd=cwd, capture_output=True,
                              text=True, timeout=60)

    (tmp_path / "package.json").write_text(json.dumps({"scripts": {"start": "node s.js"}}))
    out = run(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3 and lines[1] == "changeover serve &" and lines[2].startswith("changeover deploy v1")

    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "server.js").write_text("// mine\n")
    out = run("--example", "node", cwd=shop)
    assert out.returncode == 0, out.stderr
    assert (shop / "server.js").read_text() == "// mine\n" and "kept existing server.js" in out.stderr
    assert (shop / "changeover.toml").is_file() and (shop / "next" / "v3" / "cart.js").is_file()
    assert run("--example", "cobol", cwd=shop).returncode == 2


def test_default_config_is_found_walking_up_or_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "changeover.toml").write_text('[app]\ncommand = ["x"]\n')
    deep = tmp_path / "releases" / "v1" / "src"
    deep.mkdir(parents=True)
    # A release directory's own copy of the config (exported with its code) is passed over.
    (tmp_path / "releases" / "v1" / "changeover.toml").write_text("broken = [")
    (tmp_path / "releases" / "v1" / ".changeover-release.json").write_text("{}")
    monkeypatch.delenv("CHANGEOVER_CONFIG", raising=False)
    monkeypatch.chdir(deep)
    assert config_mod.find_config() == tmp_path / "changeover.toml"
    assert config_mod.load().file == tmp_path / "changeover.toml"
    assert config_mod.locate().root == tmp_path
    assert config_mod.find_config("other.toml") == Path("other.toml")   # an explicit -c is taken as is
    elsewhere = tmp_path / "staging.toml"
    shutil.copy(tmp_path / "changeover.toml", elsewhere)
    monkeypatch.setenv("CHANGEOVER_CONFIG", str(elsewhere))
    assert config_mod.load().file == elsewhere
    monkeypatch.delenv("CHANGEOVER_CONFIG")
    monkeypatch.chdir(tmp_path.parent)
    if not (tmp_path.parent / "changeover.toml").exists():
        assert config_mod.find_config() == Path("changeover.toml")
