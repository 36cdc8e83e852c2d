"""`changeover migrate ...` through the typer app (the main CLI mounts it as `migrate`)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeover.errors import LintFailed, MigrationError, UsageError
from changeover.migrations.cli import app
from changeover.state import State

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


def start(st: State, slot: str, version: str) -> None:
    """A release started in `slot` and switched to, through the state's own writers."""
    rel = st.add_release(version, "/srv/app", ["true"], {})
    if hasattr(st, "transition_slot"):
        st.transition_slot(slot, "starting", release_id=rel.id, instances=[{"pid": 10}])
    else:  # the state API before typed transitions
        st.set_slot(slot, "starting", rel.id, [{"pid": 10}])  # type: ignore[attr-defined]
    st.swap_live(slot)


def retire(st: State, slot: str) -> None:
    if hasattr(st, "transition_slot"):
        st.transition_slot(slot, "stopping")
        st.transition_slot(slot, "empty", instances=[])
    else:
        st.set_slot(slot, "empty", None, [])  # type: ignore[attr-defined]


def test_contract_reads_daemon_state(sqlite_project: Path) -> None:
    root = sqlite_project.parent
    invoke("safe", "-c", str(sqlite_project))
    st = State(root / ".changeover" / "state.db")
    start(st, "blue", "v1")
    start(st, "green", "v2")
    _, _, exc = invoke("contract", "-c", str(sqlite_project))
    assert isinstance(exc, MigrationError) and "older release is still live" in str(exc)
    retire(st, "blue")
    st.close()
    code, out, _ = invoke("contract", "-c", str(sqlite_project))
    assert code == 0 and "0003_drop_email" in out


def test_safe_says_where_it_stopped_once(sqlite_project: Path) -> None:
    r = runner.invoke(app, ["safe", "-c", str(sqlite_project)])
    assert r.exit_code == 0 and r.output.count("stopped before 0003_drop_email") == 1, r.output


def test_status_shows_the_source_and_a_dirty_migration(project: Project, pg_url: str) -> None:
    cfg = project(pg_url)
    add(cfg, "0001_half", "-- changeover:transaction off\nCREATE TABLE a (id bigint PRIMARY KEY);\n"
                          "CREATE INDEX CONCURRENTLY a_x ON a (x);\n")
    _, _, exc = invoke("up", "-c", str(cfg.file))
    assert isinstance(exc, MigrationError)
    code, out, _ = invoke("status", "-c", str(cfg.file))
    assert f"migrations: {cfg.root / 'migrations'} (the default [migrations] dir" in out
    assert "dirty        0001_half" in out and "up: statement 2 (line 3) failed after statement 1 ran" in out
    assert "0 pending, 1 dirty" in out
    _, _, exc = invoke("repair", "-c", str(cfg.file))
    assert isinstance(exc, UsageError)
    code, out, _ = invoke("repair", "--dirty", "pending", "-c", str(cfg.file))
    assert code == 0 and "repaired 0001_half (dirty, now pending)" in out


def test_rollback_all_force_and_baseline(sqlite_project: Path) -> None:
    db = sqlite3.connect(sqlite_project.parent / "app.db")  # a schema another tool made
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, name TEXT)")
    db.close()
    code, out, _ = invoke("baseline", "2", "-c", str(sqlite_project))
    assert code == 0 and "recorded 0001_users as applied (not run)" in out and "0002_name" in out
    st = State(sqlite_project.parent / ".changeover" / "state.db")
    start(st, "blue", "v1")
    st.close()
    _, _, exc = invoke("rollback", "--all", "-c", str(sqlite_project))
    assert isinstance(exc, MigrationError) and "release v1 (live, slot blue) was deployed after" in str(exc)
    code, out, _ = invoke("rollback", "--all", "--force", "--allow-data-loss", "--json", "-c", str(sqlite_project))
    assert code == 0 and [s["version"] for s in json.loads(out)["rolled_back"]] == ["0002", "0001"]


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
