"""One real project for the dashboard's end-to-end tests: a daemon with the example app, its
dashboard on a free loopback port, a PostgreSQL database for the migrations page, secrets in
its config (they must never reach a page), and a keep-alive load to run beside it."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from changeover.loadgen import Load
from tests.daemon.harness import Project, free_port

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium floods a closed network with refused connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DB_PASSWORD = "pw-" + uuid.uuid4().hex[:12]
API_SECRET = "sk-" + uuid.uuid4().hex
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"

CONFIG = """
[env]
FAULT_FILE = "{fault}"
DATABASE_URL = "postgresql://postgres:{pw}@127.0.0.1:5432/{db}"
PAYMENT_API_TOKEN = "{secret}"

[migrations]
dir = "migrations"

[monitor]
observe = "30s"
window = "5s"
min_requests = 10
synthetic_rate = 5
metrics_listen = ""

[dashboard]
listen = "127.0.0.1:{port}"
"""

MIGRATIONS = {
    "0001_create_items.up.sql": "CREATE TABLE items (id bigint PRIMARY KEY, name text, legacy_code text);\n",
    "0001_create_items.down.sql": "DROP TABLE items;\n",
    "0002_items_drop_legacy_code.up.sql": "ALTER TABLE items DROP COLUMN legacy_code;\n",
    "0002_items_drop_legacy_code.down.sql": "ALTER TABLE items ADD COLUMN legacy_code text;\n",
}


@dataclass
class Site:
    project: Project
    port: int
    fault: Path
    secrets: tuple[str, ...]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def login_url(self) -> str:
        return self.project.cli("dashboard").stdout.strip()

    def token(self) -> str:
        return self.login_url().split("#token=", 1)[1]

    def history(self) -> list[dict[str, Any]]:
        return list(json.loads(self.project.cli("history", "--json").stdout))


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import psycopg

    db = f"co_dash_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    root = tmp_path_factory.mktemp("dashboard")
    p = Project(root)
    port = free_port()
    fault = root / "fault.json"
    fault.write_text("{}")
    (root / "migrations").mkdir()
    for name, sql in MIGRATIONS.items():
        (root / "migrations" / name).write_text(sql)
    p.write(CONFIG.format(fault=fault, pw=DB_PASSWORD, db=db, secret=API_SECRET, port=port))
    try:
        p.start_daemon()
        p.deployed("v1")   # applies 0001 (expand); 0002 (contract) stays pending for `migrate contract`
        p.cli("promote", check=False)   # end v1's window: v1 is the settled release
        yield Site(p, port, fault, (DB_PASSWORD, API_SECRET))
    finally:
        p.teardown()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class Background:
    """Keep-alive load on the proxy from a thread of its own (the browser drives the main one)."""

    def __init__(self, port: int, connections: int = 8) -> None:
        self.load = Load(port, connections=connections, pause=0.01)
        self._loop = asyncio.new_event_loop()
        self._done: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._done = asyncio.Event()
            self._ready.set()
            await self.load.run_until(self._done)

        self._loop.run_until_complete(main())

    def __enter__(self) -> Load:
        self._thread.start()
        self._ready.wait(10)
        return self.load

    def __exit__(self, *exc: object) -> None:
        assert self._done is not None
        self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture
def load_on(site: Site) -> Iterator[Load]:
    with Background(site.project.port) as load:
        yield load


# Module scope, never session: while Playwright's sync API runs, its event loop is the main
# thread's running loop, and every later test's asyncio.run() would be refused.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package; scripts/ensure-services.sh installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (the dev extra of pyproject.toml)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def screenshot(page: Any, name: str, tmp: Path, full: bool = True) -> None:
    """Every run takes the screenshots; CHANGEOVER_SCREENSHOTS=1 writes them into docs/img."""
    target = SCREENSHOTS if os.environ.get("CHANGEOVER_SCREENSHOTS") == "1" else tmp
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / f"dashboard-{name}.png"), full_page=full)
