"""`changeover drill` with a real daemon, the example app, PostgreSQL and keep-alive users.

The drill starts a copy of the live release in the idle slot (the example app says
`X-Drill-Copy: 1` when it is one), rehearses every rollback path on its private route, and
stops it; users on the public route see neither a failure nor an answer from the copy.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from changeover.loadgen import RW, get
from tests.daemon.harness import Project
from tests.daemon.test_restart_faults import background

# Small windows so the triggers can be judged within seconds on a loaded machine; the drill's
# bound on their reaction is generous (a failure is "too slow", never a flaky wall-clock assert).
MONITOR = """
[monitor]
observe = "1m"
window = "3s"
min_requests = 10
consecutive_failures = 5
latency_window = "1s"
latency_windows = 2
latency_min_samples = 10
paired_probes = 0
metrics_listen = ""
"""


def migrations(project: Project, down: str) -> None:
    mig = project.root / "migrations"
    mig.mkdir(exist_ok=True)
    (mig / "0001_items.up.sql").write_text("CREATE TABLE items (id int PRIMARY KEY, name text);\n")
    (mig / "0001_items.down.sql").write_text("DROP TABLE items;\n")
    (mig / "0002_note.up.sql").write_text("ALTER TABLE items ADD COLUMN note text;\n")
    (mig / "0002_note.down.sql").write_text(down)


@pytest.fixture
def shop(project: Project, pg_url: str) -> Iterator[Project]:
    project.write(f'[env]\nDATABASE_URL = "{pg_url}"\n\n[migrations]\ndir = "migrations"\n{MONITOR}')
    yield project


@dataclass
class Users:
    """Keep-alive users on the public route, in a thread of their own, for as long as the drill runs."""

    port: int
    connections: int = 8
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    from_copy: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    async def _one(self) -> None:
        conn: RW | None = None
        while not self.stop.is_set():
            try:
                status, headers, _, conn = await get("127.0.0.1", self.port, "/", conn)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                self.failed.append(f"{type(e).__name__}: {e}")
                conn = None
                continue
            if status >= 500:
                self.failed.append(f"HTTP {status}")
            else:
                self.ok += 1
            if headers.get("x-drill-copy") or headers.get("x-changeover-slot"):
                self.from_copy += 1
            await asyncio.sleep(0.01)
        if conn is not None:
            conn[1].close()

    def run(self) -> threading.Thread:
        async def main() -> None:
            await asyncio.gather(*(self._one() for _ in range(self.connections)))

        t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
        t.start()
        return t


def drill(project: Project) -> tuple[int, dict[str, Any], str]:
    p = background(project, "drill", "--json", "--max-reaction", "60")
    out, err = p.communicate(timeout=300)
    return p.returncode, json.loads(out) if out.strip() else {}, err


def test_the_drill_passes_unseen_by_users(shop: Project, pg_url: str) -> None:
    migrations(shop, "ALTER TABLE items DROP COLUMN note;\n")
    shop.start_daemon()
    shop.deployed("v1")
    users = Users(shop.port)
    thread = users.run()
    try:
        code, report, err = drill(shop)
    finally:
        users.stop.set()
        thread.join(30)
    assert code == 0, ([p for p in report.get("report", []) if not p["ok"]], err)
    paths = {p["name"]: p for p in report["report"]}
    assert set(paths) == {"down migrations", "standby start", "trigger: errors", "trigger: latency",
                          "warm switch", "cold start"}
    assert all(p["ok"] for p in paths.values()), paths
    assert "2 down scripts of v1 checked, 2 run in a rolled-back transaction" in paths["down migrations"]["figure"]
    assert paths["trigger: errors"]["figure"].split()[0] in ("consecutive_failures", "error_rate")
    assert paths["trigger: latency"]["figure"].startswith("latency fired in")
    assert users.ok > 0 and users.failed == [] and users.from_copy == 0, (users.failed[:5], users.from_copy)
    # the rehearsal changed nothing: both migrations are still applied, the copy is gone
    with psycopg.connect(pg_url) as conn:
        cols = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_name = 'items'")}
    assert cols == {"id", "name", "note"}
    st = shop.status()
    assert st["live"]["version"] == "v1" and st["standby"] is None and not st["deploying"]
    past = json.loads(shop.cli("history", "--json").stdout)[0]
    assert past["kind"] == "drill" and past["state"] == "succeeded"
    assert {c["name"] for c in past["checks"]} >= {"drill: cold start", "drill: trigger: latency"}


def test_a_broken_down_script_fails_the_drill_with_its_reason(shop: Project) -> None:
    migrations(shop, "ALTER TABLE items DROP COLUMN notes_typo;\n")
    shop.start_daemon()
    shop.deployed("v1")
    code, report, err = drill(shop)
    assert code == 1, (report, err)
    paths = {p["name"]: p for p in report["report"]}
    down = paths["down migrations"]
    assert down["ok"] is False and "0002_note.down.sql" in down["detail"] and "notes_typo" in down["detail"]
    assert "rolled back" in down["detail"]
    assert paths["standby start"]["ok"] is True                   # the other paths still ran
    past = json.loads(shop.cli("history", "--json").stdout)[0]
    assert past["kind"] == "drill" and past["state"] == "failed" and "notes_typo" in past["reason"]
    assert shop.status()["standby"] is None


def test_the_drill_refuses_to_take_the_standby(project: Project) -> None:
    project.start_daemon()           # keep_standby: 10 minutes by default
    project.deployed("v1")
    project.deployed("v2")
    code, _, err = drill(project)
    assert code == 1 and "the standby a rollback would use" in err and "stop-standby" in err
    assert project.status()["standby"]["version"] == "v1"


def test_no_down_script_is_a_broken_path(shop: Project) -> None:
    migrations(shop, "")
    (shop.root / "migrations" / "0002_note.down.sql").unlink()
    shop.start_daemon()
    shop.deployed("v1")
    code, report, _ = drill(shop)
    assert code == 1
    down = {p["name"]: p for p in report["report"]}["down migrations"]
    assert down["ok"] is False and "0002_note: no down script" in down["detail"]


def test_the_haproxy_engine_is_refused_clearly(tmp_path: Path) -> None:
    import shutil

    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    p = Project(tmp_path)
    p.write()
    text = p.config.read_text()
    p.config.write_text(text.replace('drain_timeout = "5s"', 'drain_timeout = "5s"\nengine = "haproxy"'))
    try:
        p.start_daemon()
        p.deployed("v1")
        code, _, err = drill(p)
        assert code == 1 and "the drill needs [proxy] engine = embedded for now" in err
    finally:
        p.teardown()
