"""CREATE INDEX CONCURRENTLY under lock timeouts, and naming who holds a lock, on real PostgreSQL.

The blocker is a session with an open transaction that wrote to the table: a concurrent build
creates its (INVALID) index, then waits for that transaction and times out; so does the cleanup's
DROP INDEX CONCURRENTLY. Tests release the blocker from the progress callback, when the engine
reports a lock timeout, so nothing depends on timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from changeover.config import Config
from changeover.errors import MigrationError
from changeover.migrations import commands

from .conftest import Project, add


@pytest.fixture
def blocker(pg_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    conn = psycopg.connect(pg_url, application_name="cart-worker")
    yield conn
    conn.close()


def setup_table(cfg: Config) -> None:
    add(cfg, "0001_a", "CREATE TABLE a (id bigint PRIMARY KEY, code text);\nINSERT INTO a VALUES (1, 'x'), (2, 'y');")
    commands.up(cfg)


def indexes(url: str) -> list[tuple[str, bool]]:
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                         "WHERE i.indrelid = 'a'::regclass AND NOT i.indisprimary ORDER BY 1").fetchall()
    return [(str(r[0]), bool(r[1])) for r in rows]


def release_after(n: int, conn: psycopg.Connection[tuple[object, ...]], seen: list[str]) -> Callable[[str], None]:
    """A progress callback that ends the blocker's transaction at the n-th lock timeout."""

    def progress(msg: str) -> None:
        seen.append(msg)
        if "lock timeout" in msg and sum("lock timeout" in m for m in seen) == n:
            conn.rollback()

    return progress


def test_named_concurrent_index_is_retried_after_a_lock_timeout(project: Project, pg_url: str,
                                                                  blocker: psycopg.Connection[tuple[object, ...]],
                                                                  ) -> None:
    cfg = project(pg_url)
    setup_table(cfg)
    add(cfg, "0002_idx", "CREATE INDEX CONCURRENTLY a_code ON a (code);")
    blocker.execute("INSERT INTO a VALUES (3, 'z')")  # open transaction holding ROW EXCLUSIVE on a
    seen: list[str] = []
    res = commands.up(cfg, progress=release_after(1, blocker, seen))
    assert res.applied[0].attempts == 2
    assert indexes(pg_url) == [("a_code", True)]
    assert any("dropped the INVALID index" in m and "a_code" in m for m in seen)


def test_unnamed_concurrent_index_leaves_no_invalid_copies(project: Project, pg_url: str,
                                                           blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    cfg = project(pg_url)
    setup_table(cfg)
    add(cfg, "0002_idx", "CREATE INDEX CONCURRENTLY ON a (code);")
    blocker.execute("INSERT INTO a VALUES (3, 'z')")
    res = commands.up(cfg, progress=release_after(2, blocker, []))
    assert res.applied[0].attempts == 3
    assert indexes(pg_url) == [("a_code_idx", True)]  # not a_code_idx1, a_code_idx2 beside INVALID ones


def test_gives_up_naming_the_blocker_and_the_next_run_cleans_up(project: Project, pg_url: str,
                                                                 blocker: psycopg.Connection[tuple[object, ...]],
                                                                 ) -> None:
    cfg = project(pg_url)
    setup_table(cfg)
    add(cfg, "0002_idx", "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_code ON a (code);")
    blocker.execute("INSERT INTO a VALUES (3, 'z')")
    pid = blocker.info.backend_pid
    with pytest.raises(MigrationError) as e:
        commands.up(cfg)
    msg = str(e.value)
    assert "0002_idx statement 1: could not get its lock after 4 attempts" in msg
    assert f"blocked by pid {pid} (application 'cart-worker'" in msg and "INSERT INTO a VALUES (3" in msg
    assert "the INVALID index a_code it left is dropped by the next run" in msg
    assert indexes(pg_url) == [("a_code", False)]
    assert commands.status(cfg).migrations[1].state == "pending"  # nothing of it ran
    blocker.rollback()
    # IF NOT EXISTS would take the INVALID leftover for done: it is dropped before the build
    commands.up(cfg)
    assert indexes(pg_url) == [("a_code", True)]


def test_an_invalid_unnamed_index_from_an_earlier_run_is_dropped_once_the_build_succeeds(
        project: Project, pg_url: str, blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    cfg = project(pg_url)
    setup_table(cfg)
    add(cfg, "0002_idx", "CREATE INDEX CONCURRENTLY ON a (code);")
    blocker.execute("INSERT INTO a VALUES (3, 'z')")
    with pytest.raises(MigrationError):
        commands.up(cfg)
    blocker.rollback()
    assert indexes(pg_url) == [("a_code_idx", False)]
    commands.up(cfg)
    assert indexes(pg_url) == [("a_code_idx1", True)]


def test_transactional_migration_names_the_blocker(project: Project, pg_url: str,
                                                   blocker: psycopg.Connection[tuple[object, ...]]) -> None:
    cfg = project(pg_url)
    setup_table(cfg)
    add(cfg, "0002_col", "ALTER TABLE a ADD COLUMN n text;")
    blocker.execute("SELECT count(*) FROM a")  # ACCESS SHARE until the transaction ends
    with pytest.raises(MigrationError, match=r"0002_col: could not get its lock after 4 attempts .*"
                                             rf"blocked by pid {blocker.info.backend_pid} \(application "
                                             r"'cart-worker', idle in transaction.*SELECT count\(\*\) FROM a"):
        commands.up(cfg)
