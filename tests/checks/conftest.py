"""Real services for the check tests: a scratch PostgreSQL database, Redis, the example app."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "app" / "server.py"
PG_ADMIN = os.environ.get("CHANGEOVER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CHANGEOVER_TEST_REDIS", "redis://127.0.0.1:6379/0")
START_LIMIT = 15.0  # seconds for the example app to answer /health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    return free_port()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database, dropped afterwards."""
    name = f"chk_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def start_app() -> Iterator[Callable[..., str]]:
    """start_app(**env) -> base URL of a running example app; all are stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> str:
        port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith(("FAULT_", "DATABASE_URL", "REDIS_URL"))}
        full.update(env)
        proc = subprocess.Popen([sys.executable, str(APP), str(port)], env=full, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_LIMIT
        while True:  # readiness poll, not a timing assertion
            try:
                httpx.get(url + "/", timeout=1.0)
                return url
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                    raise RuntimeError(f"example app did not start: {err}") from None
                time.sleep(0.05)

    yield start
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
