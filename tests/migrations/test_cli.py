"""`changeover migrate ...` through the typer app (the main CLI mounts it as `migrate`)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeover.errors import LintFailed, MigrationError
from changeover.migrations.cli import app

from .conftest import Project, add

CORPUS = Path(__file__).parent / "corpus" / "shop"
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    r = runner.invoke(app, list(args))
    exc = r.exception if not isinstance(r.exception, SystemExit) else None
    return r.exit_code, r.stdout, exc


@pytest.fixture
def sqlite_project(project: Project) -> Path:
    cfg = project("sqlite:///app.db")
    add(cfg, "0001_users", "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT);", "DROP TABLE users;")
    add(cfg, "0002_name", "ALTER TABLE users ADD COLUMN name TEXT;", "ALTER TABLE users DROP COLUMN name;")
    add(cfg, "0003_drop_email", "-- changeover:phase contract\nALTER TABLE users DROP COLUMN email;",
        "ALTER TABLE users ADD COLUMN email TEXT;")
    return cfg.file


def test_plan_json_schema(sqlite_project: Path) -> None:
    code, out, _ = invoke("plan", "--json", "-c", str(sqlite_project))
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == "changeover.migrate.plan/1" and doc["dialect"] == "sqlite"
    assert doc["safe_applies"] == ["0001", "0002"] and doc["safe_stops_at"] == "0003"
    st = doc["pending"][2]["statements"][0]
    assert set(st) >= {"index", "line", "column", "sql", "lock", "blocks", "rewrites", "phase", "findings"}
    assert st["findings"][0]["rule"] == "dropping-column"


def test_safe_status_contract_rollback(sqlite_project: Path) -> None:
    code, out, _ = invoke("safe", "--json", "--release", "v2", "-c", str(sqlite_project))
    doc = json.loads(out)
    assert code == 0 and [s["version"] for s in doc["applied"]] == ["0001", "0002"]
    assert doc["stopped_at"]["version"] == "0003"
    code, out, _ = invoke("status", "-c", str(sqlite_project))
    assert "applied      0001_users  [expand]  release v2" in out and "1 pending" in out
    code, _, exc = invoke("contract", "-c", str(sqlite_project))
    assert isinstance(exc, MigrationError) and "--force" in str(exc)
    code, out, _ = invoke("contract", "--force", "-c", str(sqlite_project))
    assert code == 0 and "applied 0003_drop_email (contract" in out
    code, out, _ = invoke("rollback", "--steps", "2", "--json", "-c", str(sqlite_project))
    assert [s["version"] for s in json.loads(out)["rolled_back"]] == ["0003", "0002"]


def write_state(root: Path, slots: list[tuple[str, str, int | None, str]]) -> None:
    (root / ".changeover").mkdir(exist_ok=True)
    db = sqlite3.connect(root / ".changeover" / "state.db")
    db.execute("CREATE TABLE slots (name TEXT PRIMARY KEY, state TEXT NOT NULL, release_id INTEGER, "
               "instances TEXT NOT NULL DEFAULT '[]', updated_at REAL NOT NULL DEFAULT 0)")
    db.executemany("INSERT INTO slots (name, state, release_id, instances) VALUES (?, ?, ?, ?)", slots)
    db.commit()
    db.close()


def test_contract_reads_daemon_state(sqlite_project: Path) -> None:
    root = sqlite_project.parent
    invoke("safe", "-c", str(sqlite_project))
    write_state(root, [("blue", "standby", 1, '[{"pid": 10}]'), ("green", "live", 2, '[{"pid": 11}]')])
    _, _, exc = invoke("contract", "-c", str(sqlite_project))
    assert isinstance(exc, MigrationError) and "older release is still live" in str(exc)
    db = sqlite3.connect(root / ".changeover" / "state.db")
    db.execute("UPDATE slots SET state = 'empty', instances = '[]' WHERE name = 'blue'")
    db.commit()
    db.close()
    code, out, _ = invoke("contract", "-c", str(sqlite_project))
    assert code == 0 and "0003_drop_email" in out


def test_lint_json_and_exit(tmp_path: Path) -> None:
    code, out, exc = invoke("lint", "--json", str(CORPUS), "-c", str(tmp_path / "none.toml"))
    doc = json.loads(out)
    assert isinstance(exc, LintFailed) and doc["schema"] == "changeover.migrate.lint/1"
    assert doc["errors"] == 7 and doc["files"] == 54
    f = doc["findings"][0]
    assert set(f) == {"rule", "severity", "phase", "file", "line", "column", "message", "recipe", "statement",
                      "ignored"}
    ok = tmp_path / "ok.sql"
    ok.write_text("CREATE TABLE t (id bigint PRIMARY KEY);\n")
    code, out, exc = invoke("lint", str(ok), "-c", str(tmp_path / "none.toml"))
    assert code == 0 and exc is None
    bad = tmp_path / "bad.sql"
    bad.write_text("SELECT 1;\nCREATE TABEL t ();\n")
    code, out, exc = invoke("lint", str(bad), "-c", str(tmp_path / "none.toml"))
    assert isinstance(exc, LintFailed) and f"{bad}:2:8: error [parse-error]" in out


def test_new(sqlite_project: Path) -> None:
    code, out, _ = invoke("new", "add orders", "-c", str(sqlite_project))
    assert code == 0 and "0004_add_orders.up.sql" in out
    assert (sqlite_project.parent / "migrations" / "0004_add_orders.down.sql").is_file()
