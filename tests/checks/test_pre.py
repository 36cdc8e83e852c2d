"""Pre-deploy checks against real PostgreSQL, SQLite, Redis, TCP ports and commands."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg

from changeover.checks import run_critical, run_pre
from changeover.checks.result import CheckResult
from tests.checks.helpers import checks


def run(coro: object) -> list[CheckResult]:
    return asyncio.run(coro)  # type: ignore[arg-type]


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_database_and_redis_up(pg_url: str, redis_url: str) -> None:
    cfg = checks("")
    res = by_name(run(run_pre(cfg, {"DATABASE_URL": pg_url, "REDIS_URL": redis_url}, None)))
    assert res["database"].ok and "PostgreSQL 15" in res["database"].detail
    assert "connect_ms" in res["database"].data
    assert res["redis"].ok and "SET/GET/DEL" in res["redis"].detail


def test_database_down_names_cause_and_hides_password(closed_port: int) -> None:
    url = f"postgresql://app:s3cret-pw@127.0.0.1:{closed_port}/app"
    [r] = run(run_pre(checks("[checks.pre]\nredis = false"), {"DATABASE_URL": url}, None))
    assert not r.ok and r.kind == "database"
    assert "cannot connect" in r.detail and "refused" in r.detail.lower()
    assert "s3cret-pw" not in r.detail and "s3cret-pw" not in str(r.to_json())


def test_dropped_database(pg_url: str) -> None:
    gone = pg_url.rsplit("/", 1)[0] + "/chk_never_created"
    [r] = run(run_pre(checks("[checks.pre]\nredis = 'off'"), {"DATABASE_URL": gone}, None))
    assert not r.ok and 'database "chk_never_created" does not exist' in r.detail


def test_redis_down(closed_port: int) -> None:
    env = {"REDIS_URL": f"redis://:hunter2@127.0.0.1:{closed_port}/0"}
    [r] = run(run_pre(checks("[checks.pre]\ndatabase = false"), env, None))
    assert not r.ok and r.kind == "redis" and "ConnectionError" in r.detail
    assert "hunter2" not in r.detail


def test_auto_skips_unset_and_required_fails() -> None:
    res = run(run_pre(checks(""), {}, None))
    assert [r.name for r in res] == ["database", "redis"]
    assert all(r.ok and r.skipped and "not set" in r.detail for r in res)
    [r] = run(run_pre(checks("[checks.pre]\ndatabase = 'required'\nredis = 'off'"), {}, None))
    assert not r.ok and "DATABASE_URL is not set" in r.detail


def test_sqlite_ok_and_missing_file(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "app.db"
    sqlite3.connect(path).close()
    cfg = checks("[checks.pre]\nredis = false")
    [ok] = run(run_pre(cfg, {"DATABASE_URL": f"sqlite:///{path}"}, None))
    assert ok.ok and "SQLite" in ok.detail
    [bad] = run(run_pre(cfg, {"DATABASE_URL": f"sqlite:///{tmp_path / 'missing.db'}"}, None))
    assert not bad.ok and "cannot open SQLite database" in bad.detail
    assert not (tmp_path / "missing.db").exists()  # the check must not create it


def test_unsupported_scheme() -> None:
    [r] = run(run_pre(checks("[checks.pre]\nredis = false"), {"DATABASE_URL": "mysql://x@h/db"}, None))
    assert not r.ok and "unsupported database URL scheme 'mysql'" in r.detail


INTEGRITY = """
[checks.pre]
redis = false
[[checks.pre.integrity]]
name = "no orphan order lines"
sql = "SELECT l.id, l.order_id FROM order_lines l LEFT JOIN orders o ON o.id = l.order_id WHERE o.id IS NULL"
[[checks.pre.integrity]]
name = "totals are not negative"
sql = "SELECT NOT EXISTS (SELECT 1 FROM orders WHERE total < 0)"
"""


def _shop(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric NOT NULL)")
        c.execute("CREATE TABLE order_lines (id int PRIMARY KEY, order_id int NOT NULL)")
        c.execute("INSERT INTO orders VALUES (1, 10), (2, 5)")
        c.execute("INSERT INTO order_lines VALUES (1, 1), (2, 2)")


def test_integrity_passes_then_fails_on_orphan_row(pg_url: str) -> None:
    _shop(pg_url)
    cfg = checks(INTEGRITY)
    res = by_name(run(run_pre(cfg, {"DATABASE_URL": pg_url}, None)))
    assert res["integrity no orphan order lines"].ok
    assert res["integrity totals are not negative"].detail == "returned true"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO order_lines VALUES (3, 99)")
        c.execute("UPDATE orders SET total = -1 WHERE id = 2")
    res = by_name(run(run_pre(cfg, {"DATABASE_URL": pg_url}, None)))
    orphan, negative = res["integrity no orphan order lines"], res["integrity totals are not negative"]
    assert not orphan.ok and "returned 1 row" in orphan.detail and "(3, 99)" in orphan.detail
    assert not negative.ok and negative.detail == "returned false"


def test_integrity_is_read_only_and_bounded(pg_url: str) -> None:
    _shop(pg_url)
    cfg = checks("""
[checks.pre]
redis = false
[[checks.pre.integrity]]
name = "sneaky write"
sql = "DELETE FROM order_lines RETURNING id"
[[checks.pre.integrity]]
name = "escape attempt"
sql = "COMMIT; DELETE FROM order_lines"
[[checks.pre.integrity]]
name = "slow"
sql = "SELECT pg_sleep(5) IS NULL"
timeout = "300ms"
[[checks.pre.integrity]]
name = "typo"
sql = "SELECT 1 FROM no_such_table"
""")
    res = by_name(run(run_pre(cfg, {"DATABASE_URL": pg_url}, None)))
    assert not res["integrity sneaky write"].ok and "read-only" in res["integrity sneaky write"].detail
    assert not res["integrity escape attempt"].ok and "read-only" in res["integrity escape attempt"].detail
    assert not res["integrity slow"].ok and "statement timeout" in res["integrity slow"].detail
    assert not res["integrity typo"].ok and "no_such_table" in res["integrity typo"].detail
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM order_lines").fetchone() == (2,)


def test_integrity_needs_a_database() -> None:
    db, *integrity = run(run_pre(checks(INTEGRITY), {}, None))
    assert db.skipped and len(integrity) == 2
    assert all(not r.ok and "needs DATABASE_URL" in r.detail for r in integrity)


def test_integrity_on_sqlite(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE orders (id int, total int)")
        c.execute("INSERT INTO orders VALUES (1, -3)")
    cfg = checks("""
[checks.pre]
redis = false
[[checks.pre.integrity]]
name = "totals"
sql = "SELECT NOT EXISTS (SELECT 1 FROM orders WHERE total < 0)"
""")
    res = by_name(run(run_pre(cfg, {"DATABASE_URL": f"sqlite:///{path}"}, None)))
    assert not res["integrity totals"].ok and res["integrity totals"].detail == "returned false"


def test_connection_budget(pg_url: str) -> None:
    small = checks("[checks.pre]\nredis = false\n[checks.pre.connections]\ngreen_pool = 5\nheadroom = 2")
    r = by_name(run(run_pre(small, {"DATABASE_URL": pg_url}, None)))["connection budget"]
    assert r.ok and "max_connections" in r.detail and r.data["needed"] == 7
    big = checks("[checks.pre]\nredis = false\n[checks.pre.connections]\ngreen_pool = 100000")
    r = by_name(run(run_pre(big, {"DATABASE_URL": pg_url}, None)))["connection budget"]
    assert not r.ok
    assert "not enough connections for the green slot" in r.detail and "needs 100000" in r.detail
    assert r.data["free"] < 100000 and r.data["max_connections"] > 0


def test_services_tcp_and_command(redis_url: str, closed_port: int) -> None:
    cfg = checks(f"""
[checks.pre]
database = false
redis = false
[[checks.pre.services]]
name = "redis port"
tcp = "127.0.0.1:6379"
critical = true
[[checks.pre.services]]
name = "gone"
tcp = "127.0.0.1:{closed_port}"
[[checks.pre.services]]
name = "worker alive"
command = ["{sys.executable}", "-c", "print('all good')"]
[[checks.pre.services]]
name = "worker dead"
command = ["{sys.executable}", "-c", "import sys; print('queue stalled'); sys.exit(3)"]
critical = true
[[checks.pre.services]]
name = "missing"
command = ["/nonexistent/probe"]
""")
    res = by_name(run(run_pre(cfg, {}, None)))
    assert res["service redis port"].ok
    assert not res["service gone"].ok and "unreachable" in res["service gone"].detail
    assert res["service worker alive"].ok and "all good" in res["service worker alive"].detail
    dead = res["service worker dead"]
    assert not dead.ok and "exited with 3" in dead.detail and "queue stalled" in dead.detail
    assert not res["service missing"].ok and "command not found" in res["service missing"].detail
    # the monitor's subset: only critical services (database/redis are off here)
    crit = run(run_critical(cfg, {}))
    assert [r.name for r in crit] == ["service redis port", "service worker dead"]


def test_command_timeout_kills_it() -> None:
    cfg = checks(f"""
[checks.pre]
database = false
redis = false
[[checks.pre.services]]
name = "hangs"
command = ["{sys.executable}", "-c", "import time; time.sleep(30)"]
timeout = "300ms"
""")
    [r] = run(run_pre(cfg, {}, None))
    assert not r.ok and "timed out after 0.3s" in r.detail


def test_endpoints_skipped_without_live_version_then_checked(start_app: Callable[..., str]) -> None:
    cfg = checks("""
[checks.pre]
database = false
redis = false
[[checks.pre.endpoints]]
path = "/health"
[[checks.pre.endpoints]]
path = "/me"
expect.status = 401
""")
    [skip] = run(run_pre(cfg, {}, None))
    assert skip.ok and skip.skipped and "nothing is live yet" in skip.detail
    url = start_app(FAULT_HEALTH="fail")
    res = by_name(run(run_pre(cfg, {}, url)))
    assert not res["endpoint GET /health"].ok and "expected status 2xx, got 503" in res["endpoint GET /health"].detail
    assert res["endpoint GET /me"].ok


def test_run_critical_includes_database_and_redis(pg_url: str, redis_url: str) -> None:
    res = run(run_critical(checks(""), {"DATABASE_URL": pg_url, "REDIS_URL": redis_url}))
    assert [(r.name, r.ok) for r in res] == [("database", True), ("redis", True)]
