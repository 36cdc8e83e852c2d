"""The Node shop example's README, walked for real: `init --example node`, three releases from git
(expand -> switch -> contract), builds with `npm ci`, a signed-in user's session and cart across
every deploy and a rollback, and the npm migration scripts run from inside a release directory.
Real daemon, real PostgreSQL and Redis, real Node processes. npm's cache is kept under the
repository's .cache/, so only the first run downloads packages."""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover.config import locate
from tests.daemon.harness import _pids_under, free_port

ROOT = Path(__file__).resolve().parents[2]
NPM_CACHE = ROOT / ".cache" / "node-shop" / "npm"
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node and npm are needed to run the Node shop example "
                                       "(scripts/ensure-services.sh installs them)")


@pytest.fixture
def database() -> Iterator[str]:
    import psycopg

    name = f"co_shop_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Shop:
    """The newcomer's shell: a directory, an environment with changeover on PATH, a daemon."""

    def __init__(self, root: Path, database: str) -> None:
        self.root = root
        self.port = free_port()
        self.database = database
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "npm_config_cache": str(NPM_CACHE), "npm_config_update_notifier": "false"}
        self.env.pop("CHANGEOVER_CONFIG", None)
        self.daemon: subprocess.Popen[bytes] | None = None
        jar = http.cookiejar.CookieJar()
        self.browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def sh(self, *argv: str, cwd: Path | None = None, check: bool = True, timeout: float = 600,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(argv, cwd=cwd or self.root, env=env or self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}\n{self.serve_log()}")
        return p

    def co(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.sh(sys.executable, "-m", "changeover", *args, **kw)

    def git(self, *args: str) -> str:
        return self.sh("git", "-c", "user.name=Ada", "-c", "user.email=ada@example.com", *args).stdout.strip()

    def release(self, tag: str, overlay: str | None = None) -> None:
        """The next release of the walk: copy next/vN over the app, commit, tag."""
        if overlay:
            shutil.copytree(self.root / "next" / overlay, self.root, dirs_exist_ok=True)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", f"release {tag}")
        self.git("tag", tag)

    def serve(self) -> None:
        log = open(self.root / "serve.out", "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen([sys.executable, "-m", "changeover", "serve"], cwd=self.root, env=self.env,
                                       stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise AssertionError("daemon exited\n" + self.serve_log())
            # The CLI (a Python start each) once the daemon has made its control socket.
            if locate(self.root / "changeover.toml").socket_path.exists() and \
                    self.co("status", "--json", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("daemon did not come up\n" + self.serve_log())

    def serve_log(self) -> str:
        p = self.root / "serve.out"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with self.browser.open(req, timeout=10) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def columns(self) -> set[str]:
        import psycopg

        with psycopg.connect(self.database) as conn:
            rows = conn.execute("SELECT column_name FROM information_schema.columns "
                                "WHERE table_name = 'cart_items'").fetchall()
        return {r[0] for r in rows}

    def teardown(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.co("down", check=False, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout=30)
            if self.daemon.poll() is None:
                self.daemon.kill()
        for pid in _pids_under(self.root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_the_readme_walk_from_init_to_contract(tmp_path: Path, database: str) -> None:
    shop = Shop(tmp_path / "shop", database)
    shop.root.mkdir()
    try:
        # A fresh project from the example; the next three commands are printed.
        out = shop.co("init", "--example", "node")
        assert "changeover serve" in out.stdout and (shop.root / "changeover.toml").is_file()
        env_file = (shop.root / ".env.example").read_text()
        env_file = env_file.replace("postgresql://shop:shop@127.0.0.1:5432/shop", database)
        env_file = env_file.replace("SESSION_SECRET=change-me", f"SESSION_SECRET={uuid.uuid4().hex}")
        env_file = env_file.replace("LISTEN=127.0.0.1:8080", f"LISTEN=127.0.0.1:{shop.port}")
        (shop.root / ".env").write_text(env_file)
        # The walk is about its steps (the triggers have their own tests): on a loaded test machine
        # a slow database connect or response must not roll a release back in the middle of it.
        with (shop.root / "changeover.toml").open("a") as f:
            f.write('probe_timeout = "10s"\nprobe_failures = 20\nlatency_ratio = 1000.0\nmetrics_listen = ""\n')
        shop.git("init", "-q", "-b", "main")
        shop.release("v1")
        shop.serve()

        # Release 1: exported from git, built with npm ci, verified, live.
        dep = shop.co("deploy", "v1", "--git", "v1")
        assert "npm ci" in dep.stderr or "added" in dep.stderr, dep.stderr     # the build's output, streamed
        assert (shop.root / "releases" / "v1" / "node_modules" / "express").is_dir()
        assert not (shop.root / "releases" / "v1" / "next").exists()           # .gitattributes export-ignore
        assert shop.request("GET", "/") == (200, "node-shop v1\n")
        assert shop.request("POST", "/login", {"user": "ada"})[0] == 200
        assert shop.request("POST", "/cart", {"item": "tea"})[0] == 201   # (a first deploy is not observed)

        # Release 2, expand: sku added and written next to item; ada is still signed in.
        shop.release("v2", "v2")
        shop.co("deploy", "v2", "--git", "v2")
        status, cart = shop.request("GET", "/cart")
        assert status == 200 and cart["items"] == ["tea"] and cart["version"] == "v2"
        assert {"item", "sku"} <= shop.columns()
        shop.co("promote")

        # Release 3, switch: reads and writes sku only; the contract migration waits.
        shop.release("v3", "v3")
        dep = shop.co("deploy", "v3", "--git", "v3")
        assert shop.request("GET", "/cart")[1]["items"] == ["tea"]
        assert shop.request("POST", "/cart", {"item": "jam"})[0] == 201
        assert "item" in shop.columns()
        # From inside the release directory: the config is found by walking up.
        rel3 = shop.root / "releases" / "v3"
        status_out = shop.sh("npm", "run", "--silent", "db:migrate:status", cwd=rel3).stdout
        assert "0003" in status_out and "pending" in status_out

        # A rollback: v2 is warm, so it is one switch; it reads what v3 wrote (COALESCE).
        shop.co("rollback", "--reason", "walk-through")
        status, cart = shop.request("GET", "/cart")
        assert cart["version"] == "v2" and cart["items"] == ["tea", "jam"]

        # v3 again (its release directory is reused), then the contract step once v2 is gone.
        shop.co("deploy", "v3", "--git", "v3")
        shop.co("promote")
        shop.co("stop-standby")
        refused = shop.sh("npm", "run", "db:migrate:contract", cwd=rel3, check=False)
        assert refused.returncode == 0, refused.stderr
        assert "item" not in shop.columns()
        status, cart = shop.request("GET", "/cart")
        assert status == 200 and cart["items"] == ["tea", "jam"] and cart["version"] == "v3"

        # The contract step can be undone too, from the same folder.
        shop.sh("npm", "run", "db:migrate:rollback", cwd=rel3)
        assert "item" in shop.columns()

        # CHANGEOVER_CONFIG names the file from anywhere.
        st = shop.co("status", "--json", cwd=tmp_path, env={**shop.env, "CHANGEOVER_CONFIG": str(
            shop.root / "changeover.toml")})
        assert json.loads(st.stdout)["live"]["version"] == "v3"
        hist = json.loads(shop.co("history", "--json").stdout)
        # Newest first: v3 again, and the v3 deploy the manual rollback ended during its window.
        assert [(d["version"], d["state"]) for d in hist][:2] == [("v3", "succeeded"), ("v3", "rolled_back")]
    finally:
        shop.teardown()
