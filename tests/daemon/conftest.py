from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.harness import Project

# Modules whose every test is about what all the proxy workers do: the daemon killed inside its
# steps must leave each worker agreeing with the state; a pause or maintenance holds on each.
SEVERAL_WORKERS = {"tests.daemon.test_restart_faults", "tests.daemon.test_pause_maintenance"}


def proxy_workers(request: pytest.FixtureRequest) -> int:
    """One proxy worker unless the test is marked `proxy_workers(n)` (see pyproject.toml)."""
    mark = request.node.get_closest_marker("proxy_workers")
    if mark is not None:
        return int(mark.args[0])
    return 2 if request.module.__name__ in SEVERAL_WORKERS else 1


@pytest.fixture
def project(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Project]:
    p = Project(tmp_path, workers=proxy_workers(request))
    p.write()
    try:
        yield p
    finally:
        p.teardown()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import uuid

    import psycopg

    name = f"co_daemon_{uuid.uuid4().hex[:10]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
