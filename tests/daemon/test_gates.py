"""Health gates in the deploy pipeline, against real PostgreSQL, Redis and the example app.

Each fault stops the deploy at the right step with a clear message, and the old version keeps
serving throughout (a keep-alive load runs the whole time and must see no failure).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg

from changeover.loadgen import Load
from tests.daemon.harness import Project

REDIS = "redis://127.0.0.1:6379/0"

GATES = """
[env]
DATABASE_URL = "{db}"
REDIS_URL = "{redis}"
ITEMS_QUERY = "SELECT id, name FROM items"

[migrations]
database = "{db}"
dir = "migrations"

[checks.pre]
database = "required"
redis = "required"

[[checks.pre.integrity]]
name = "no negative totals"
sql = "SELECT id FROM orders WHERE total < 0"

[checks.version]
field = "version"

[[checks.smoke]]
name = "items"
path = "/items"

[[checks.flow]]
name = "sign in"
[[checks.flow.steps]]
name = "login"
method = "POST"
path = "/login"
json = {{ user = "alice" }}
[[checks.flow.steps]]
name = "add to cart"
method = "POST"
path = "/cart"
json = {{ item = "book" }}
[[checks.flow.steps]]
name = "read cart"
path = "/cart"
expect = {{ json = {{ user = "alice", cart = ["book"] }} }}

[checks.session]
flow = "sign in"
verify = {{ path = "/me", expect = {{ json = {{ user = "alice" }} }} }}
"""


def setup_db(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text)")
        conn.execute("INSERT INTO items(name) VALUES ('book'), ('pen')")
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, total numeric NOT NULL)")
        conn.execute("INSERT INTO orders VALUES (1, 10)")


def steps_of(p: Project) -> list[str]:
    hist = json.loads(p.cli("history", "--json").stdout)
    return [s["name"] for s in hist[0]["steps"]]


def test_each_gate_stops_the_deploy_and_the_old_version_keeps_serving(project: Project, pg_url: str) -> None:
    setup_db(pg_url)
    (project.root / "migrations").mkdir()
    project.write(GATES.format(db=pg_url, redis=REDIS))
    project.start_daemon()
    first = project.deploy("v1")
    assert "session sign-in" not in first.stderr  # nothing was live: no session to carry over

    async def scenario() -> Load:
        load = Load(project.port, connections=10, pause=0.005)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))

        async def deploy(version: str, *args: str) -> str:
            p = await asyncio.to_thread(project.deploy, version, *args, check=False)
            assert p.returncode == 1, p.stderr
            # Before the switch v1 was never left; after it (session lost) it is live again.
            assert ("v1 is still live" in p.stderr or "v1 is live again" in p.stderr), p.stderr
            assert "Traceback" not in p.stderr
            return p.stderr

        # Database down: caught before anything starts.
        err = await deploy("v2", "--env", "DATABASE_URL=postgresql://postgres@127.0.0.1:1/nope")
        assert "pre-deploy checks" in err and "database" in err
        assert not any(s.startswith("start") for s in steps_of(project))
        # Redis (the session store) down.
        err = await deploy("v2", "--env", "REDIS_URL=redis://127.0.0.1:1/0")
        assert "pre-deploy checks" in err and "redis" in err
        # Data integrity: a negative total.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO orders VALUES (2, -5)")
        err = await deploy("v2")
        assert "no negative totals" in err
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DELETE FROM orders WHERE id = 2")
        # The wrong build: green reports another version.
        err = await deploy("v2", "--env", "FAULT_VERSION=v1")
        assert "verify green (private)" in err and "version" in err
        # A smoke test failing on green (its query is broken).
        err = await deploy("v2", "--env", "ITEMS_QUERY=SELECT missing FROM items")
        assert "verify green (private)" in err and "items" in err
        # Old code on the new schema: a rename forced through as "expand" breaks v1's query.
        mig = project.root / "migrations"
        (mig / "0001_rename_name.up.sql").write_text(
            "-- changeover:phase expand\n"
            "-- changeover:ignore renaming-column the team says v1 tolerates it (it does not)\n"
            "ALTER TABLE items RENAME COLUMN name TO title;\n")
        (mig / "0001_rename_name.down.sql").write_text("ALTER TABLE items RENAME COLUMN title TO name;\n")
        err = await deploy("v2", "--env", "ITEMS_QUERY=SELECT id, title FROM items")
        assert "old code on new schema (blue)" in err, err
        # Undo the forced migration so the next cases start from v1's schema.
        await asyncio.to_thread(project.cli, "migrate", "rollback", "--steps", "1")
        (mig / "0001_rename_name.up.sql").unlink()
        (mig / "0001_rename_name.down.sql").unlink()
        # Session lost across the switch: v2 is pointed at another Redis database by mistake.
        err = await deploy("v2", "--env", "REDIS_URL=redis://127.0.0.1:6379/1")
        assert "session lost" in err and "switch back to blue" in steps_of(project)
        await asyncio.sleep(0.3)
        done.set()
        await runner
        return load

    load = asyncio.run(scenario())
    assert load.failed == 0, load.errors[:5]
    assert set(load.versions) <= {"v1", "v2"}
    st = project.status()
    assert st["live"]["version"] == "v1" and not st["deploying"]

    # With everything healthy, the same gates pass and the session survives the switch.
    ok = project.deploy("v2")
    assert "session verify" in ok.stderr and "v2 is live" in ok.stderr
    hist = json.loads(project.cli("history", "--json").stdout)
    kinds = {c["kind"] for c in hist[0]["checks"]}
    assert {"database", "redis", "integrity", "version", "smoke", "flow", "session"} <= kinds
    checks = project.cli("history", "--checks").stdout
    assert "session verify" in checks and "postgres@" not in checks.replace("postgres@***", "")


def test_check_cli_reports_and_fails(project: Project, pg_url: str, tmp_path: Path) -> None:
    setup_db(pg_url)
    project.write(GATES.format(db=pg_url, redis="redis://127.0.0.1:1/0"))
    p = project.cli("check", "pre", "--json", check=False)
    assert p.returncode == 1
    results = json.loads(p.stdout)
    by_kind = {r["kind"]: r for r in (results["results"] if isinstance(results, dict) else results)}
    assert by_kind["database"]["ok"] and not by_kind["redis"]["ok"]
