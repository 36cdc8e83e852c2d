"""`make demo`: the bundled example app, deployed, switched and rolled back under load.

Runs on embedded defaults only (the embedded proxy, SQLite for the migrations; no PostgreSQL or
Redis). Everything happens in ./.demo/, through the same daemon and CLI a user runs:

  1. start `changeover serve`;  2. deploy v1;  3. put keep-alive load on the proxy;
  4. deploy v2 (with an expand migration);  5. roll back to v1;  6. deploy v3, which starts
  failing after the switch and is rolled back automatically;  7. print what the users saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from changeover.daemon.procs import free_port
from changeover.loadgen import Load, get

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "app"
out = Console(highlight=False, soft_wrap=True)



CONFIG = """\
# The demo project's config: every value not set here is changeover's default.
[app]
command = ["{python}", "server.py", "$PORT"]
health_path = "/health"
instances = 2

[env]
APP_ENV = "demo"
DATABASE_URL = "sqlite:///{root}/app.db"
FAULT_FILE = "{root}/fault.json"

[proxy]
listen = "127.0.0.1:{port}"
drain_timeout = "5s"

[migrations]
database = "sqlite:///{root}/app.db"
dir = "migrations"

[checks.version]
field = "version"

[[checks.smoke]]
name = "home page"
path = "/"
expect = {{ status = 200 }}

[monitor]
observe = "6s"
keep_standby = "10m"
"""

MIGRATIONS = {
    "0001_create_items.up.sql": "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\n",
    "0001_create_items.down.sql": "DROP TABLE items;\n",
    "0002_add_items_note.up.sql": "-- changeover:phase expand\nALTER TABLE items ADD COLUMN note TEXT;\n",
    "0002_add_items_note.down.sql": "ALTER TABLE items DROP COLUMN note;\n",
}


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.config = root / "changeover.toml"
        self.switches: list[tuple[str, float]] = []
        self.reaction: float | None = None

    def setup(self) -> None:
        if self.root.exists():
            self._down_leftovers()
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.config.write_text(CONFIG.format(python=sys.executable, root=self.root, port=self.port))
        (self.root / "fault.json").write_text("{}")
        sqlite3.connect(self.root / "app.db").close()  # the site's database exists before any deploy
        mig = self.root / "migrations"
        mig.mkdir()
        for name, sql in MIGRATIONS.items():
            if name.startswith("0001"):
                (mig / name).write_text(sql)

    def _down_leftovers(self) -> None:
        """A previous demo may have left its proxy and app running (e.g. its daemon was killed):
        bring that project up once more and down properly before deleting it."""
        if not (self.root / ".changeover").exists() or not self.config.exists():
            return
        if self.cli("down", check=False, quiet=True).returncode == 0:
            time.sleep(1)
            return
        old = subprocess.Popen([sys.executable, "-m", "changeover", "serve", "-c", str(self.config)],
                               cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and old.poll() is None:
            if self.cli("down", check=False, quiet=True).returncode == 0:
                break
            time.sleep(0.3)
        try:
            old.wait(timeout=30)
        except subprocess.TimeoutExpired:
            old.kill()

    def release(self, version: str) -> Path:
        d = self.root / "releases" / version
        shutil.copytree(EXAMPLE, d, dirs_exist_ok=True)
        return d

    def cli(self, *args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "changeover", *args, "-c", str(self.config)]
        p = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "COLUMNS": "140"})
        if not quiet:
            for line in p.stderr.splitlines():
                out.print(f"    [dim]│[/] {line}", markup=True, highlight=False)
        if check and p.returncode != 0:
            raise SystemExit(f"demo: `changeover {' '.join(args)}` failed with exit code {p.returncode}")
        return p

    def start_daemon(self) -> None:
        log = open(self.root / "serve.log", "ab")  # noqa: SIM115 - handed to the daemon
        self.daemon = subprocess.Popen([sys.executable, "-m", "changeover", "serve", "-c", str(self.config)],
                                       cwd=self.root, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SystemExit("demo: the daemon exited; see " + str(self.root / "serve.log"))
            if self.cli("status", "--json", check=False, quiet=True).returncode == 0:
                return
            time.sleep(0.2)
        raise SystemExit("demo: the daemon did not start; see " + str(self.root / "serve.log"))

    def step(self, text: str) -> None:
        out.print(f"\n[bold cyan]▶ {text}[/]")

    def record_switch(self, p: subprocess.CompletedProcess[str], what: str) -> None:
        try:
            data = json.loads(p.stdout)
        except ValueError:
            return
        if isinstance(data, dict) and "switch_ms" in data:
            self.switches.append((what, float(data["switch_ms"])))

    async def scenario(self) -> tuple[Load, dict[str, Any]]:
        self.step("deploy v1 (first release: blue)")
        self.cli("deploy", "v1", "--path", str(self.release("v1")))
        load = Load(self.port, connections=20, pause=0.002)
        done = asyncio.Event()
        runner = asyncio.create_task(load.run_until(done))
        await asyncio.sleep(2)
        out.print(f"    load: 20 keep-alive connections, {load.ok} requests served so far")

        self.step("deploy v2 with an expand migration (green), while users keep clicking")
        for name, sql in MIGRATIONS.items():
            (self.root / "migrations" / name).write_text(sql)
        p = await asyncio.to_thread(self.cli, "deploy", "v2", "--path", str(self.release("v2")), "--wait",
                                    "--json")
        self.record_switch(p, "deploy v2")
        await asyncio.sleep(1)

        self.step("roll back to v1 (its slot is still warm)")
        p = await asyncio.to_thread(self.cli, "rollback", "--reason", "demo", "--json")
        self.record_switch(p, "rollback to v1")
        await asyncio.sleep(1)

        self.step("deploy v3, which starts failing 100% after the switch: automatic rollback")
        fault = self.root / "fault.json"
        v3 = self.release("v3")

        async def break_v3() -> None:
            # Wait until users reach v3, then make it fail (the fault file is read per request).
            # Asked of the proxy itself, not of `changeover status`: a CLI call can take seconds on
            # a busy machine, and the fault must begin well inside the observation window.
            for _ in range(3000):
                _, headers, _, c = await get("127.0.0.1", self.port, "/")
                if c is not None:
                    c[1].close()
                if headers.get("x-version") == "v3":
                    await asyncio.sleep(1)    # past the checks through the proxy: the monitor's turn
                    fault.write_text(json.dumps({"error_rate": 1.0, "only_version": "v3"}))
                    onset = time.monotonic()
                    # Users see v1 again as soon as the proxy has switched back.
                    while time.monotonic() - onset < 30:
                        _, headers, _, c = await get("127.0.0.1", self.port, "/")
                        if c is not None:
                            c[1].close()
                        if headers.get("x-version") == "v1":
                            self.reaction = time.monotonic() - onset
                            return
                        await asyncio.sleep(0.01)
                    return
                await asyncio.sleep(0.01)

        breaker = asyncio.create_task(break_v3())
        p = await asyncio.to_thread(self.cli, "deploy", "v3", "--path", str(v3), "--wait",
                                    "--env", "FAULT_ONLY_VERSION=v3", check=False)
        await breaker
        fault.write_text("{}")
        await asyncio.sleep(1)
        done.set()
        await runner
        status = json.loads(self.cli("status", "--json", quiet=True).stdout)
        return load, status

    def report(self, load: Load, status: dict[str, Any]) -> None:
        self.step("what the users saw")
        t = Table(box=None)
        t.add_column("")
        t.add_column("value", justify="right")
        t.add_row("requests served", str(load.ok))
        t.add_row("requests failed (connection errors or 5xx)", str(load.failed))
        for version, n in sorted(load.versions.items()):
            t.add_row(f"  answered by {version}", str(n))
        for version, n in sorted(load.failed_versions.items()):
            t.add_row(f"  5xx from {version}", str(n))
        for what, ms in self.switches:
            t.add_row(f"switch time: {what}", f"{ms:.1f} ms")
        if self.reaction is not None:
            t.add_row("v3 fault onset -> users on v1 again", f"{self.reaction * 1000:.0f} ms")
        live = status.get("live") or {}
        t.add_row("live now", f"{live.get('version')} ({live.get('slot')})")
        out.print(t)
        others = load.failed - load.failed_versions.get("v3", 0)
        out.print(f"    requests lost to switches and rollbacks: [bold]{others}[/]; the 5xx from v3 are its own "
                  "errors in the moments before the automatic rollback")
        hist = self.cli("history", quiet=True).stdout
        out.print(hist)

    def teardown(self) -> None:
        if self.daemon is not None:
            self.cli("down", check=False, quiet=True)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.daemon.pid, signal.SIGKILL)


def main() -> None:
    root = Path(os.environ.get("CHANGEOVER_DEMO_DIR", Path.cwd() / ".demo")).absolute()
    demo = Demo(root)
    demo.setup()
    out.print(f"[bold]changeover demo[/] in {root} (proxy on 127.0.0.1:{demo.port})")
    try:
        demo.start_daemon()
        load, status = asyncio.run(demo.scenario())
        demo.report(load, status)
    finally:
        demo.teardown()


if __name__ == "__main__":
    main()
