"""`changeover pause` / `resume` / `maintenance on|off` with a real daemon, the example app and
keep-alive users.

Held requests complete after resume and none is lost; a pause ends at its timeout by itself;
maintenance answers 503 with the page and Retry-After while requests in flight finish and a
deploy still goes through; status and history show both. The daemon killed (SIGKILL, SIGTERM)
while paused or in maintenance, or between the state's write and the proxy's change: the proxy
keeps the mode, and after the restart status is right and `resume` / `off` work.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from changeover import commands, config
from changeover.errors import ConfigError
from changeover.loadgen import Load, get
from changeover.state import State
from tests.daemon.harness import Project
from tests.daemon.test_restart_faults import background

PAGE = "<!doctype html><title>Back soon</title><h1>We are upgrading the database</h1>\n"


class Users:
    """Keep-alive users in a thread of their own (changeover.loadgen.Load)."""

    def __init__(self, port: int, connections: int) -> None:
        self.load = Load(port, connections=connections)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    async def _main(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self.load.run_until(self._done)

    def stop(self) -> dict[str, Any]:
        assert self._loop is not None and self._done is not None
        self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(60)
        return self.load.summary()


def until(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def fetch(project: Project, path: str = "/", timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One GET on a connection of its own."""
    async def one() -> tuple[int, dict[str, str], bytes]:
        status, headers, body, rw = await get("127.0.0.1", project.port, path, timeout=timeout)
        if rw is not None:
            rw[1].close()
        return status, headers, body

    return asyncio.run(one())


def status(project: Project) -> dict[str, Any]:
    """`status --json` without a CLI process (the CLI's own output is checked where it matters)."""
    return commands.status(config.locate(project.config))


class ctl:
    """The verbs through commands.py, in this process (a CLI process costs over a second here)."""

    def __init__(self, project: Project) -> None:
        self.where = config.locate(project.config)

    def pause(self, timeout: float) -> dict[str, Any]:
        return commands.pause(self.where, timeout=timeout)

    def resume(self) -> dict[str, Any]:
        return commands.resume(self.where)

    def maintenance(self, on: bool, retry_after: int | None = None) -> dict[str, Any]:
        return commands.maintenance(self.where, on, retry_after=retry_after)


def history(project: Project) -> list[dict[str, Any]]:
    return commands.history(config.locate(project.config), 20, traffic=True)


def mode_in_state(project: Project, name: str) -> Any:
    st = State(project.root / ".changeover" / "state.db", readonly=True)
    try:
        return st.mode(name)
    finally:
        st.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as ex:
        yield ex


def test_pause_holds_users_and_resume_releases_every_request(project: Project) -> None:
    project.start_daemon()
    project.deployed("v1")
    users = Users(project.port, 20)
    try:
        until(lambda: users.load.ok > 50, what="load flowing")
        out = project.cli("pause", "--timeout", "60", "--reason", "database failover")
        assert "paused" in out.stderr
        st = until(lambda: (s := status(project))["pause"]["held"] == 20 and s, what="every user held")
        assert st["mode"] == "paused" and st["pause"]["why"] == "database failover"
        served = users.load.ok
        assert "paused" in project.cli("status").stdout
        assert status(project)["pause"]["held"] == 20 and users.load.ok == served   # held: nothing answered
        out = project.cli("resume")
        assert "20 held request(s)" in out.stderr, out.stderr
        until(lambda: users.load.ok > served + 100, what="held requests answered, load flowing again")
    finally:
        summary = users.stop()
    assert summary["failed"] == 0, (summary, users.load.errors[:5])
    assert status(project)["mode"] == "serving"

    # the pause ends at its timeout by itself, and the state follows
    assert ctl(project).pause(timeout=2)["mode"] == "paused"
    code, headers, _ = fetch(project)           # held, then released by the proxy's own deadline
    assert code == 200 and headers["x-version"] == "v1"
    until(lambda: status(project)["mode"] == "serving", what="status after the pause timeout")
    rows = [r for r in history(project) if r["id"] is None]
    assert [r["kind"] for r in rows] == ["resumed", "paused", "resumed", "paused"]
    assert rows[0]["actor"] == "timeout" and "timeout" in rows[0]["reason"]
    assert rows[3]["reason"] == "database failover" and rows[3]["actor"]
    text = project.cli("history").stdout
    assert "paused" in text and "resumed" in text and "database failover" in text


def test_maintenance_answers_503_with_the_page_and_a_deploy_goes_through(project: Project,
                                                                          pool: ThreadPoolExecutor) -> None:
    project.write("retry_after = 45\n")
    (project.root / "page.html").write_text(PAGE)
    project.start_daemon()
    project.deployed("v1")
    slow: Future[tuple[int, dict[str, str], bytes]] = pool.submit(fetch, project, "/slow?ms=1500")
    # (the slow request reaches the app while this CLI starts: it is in flight when maintenance begins)
    bad = project.cli("maintenance", "on", "--page", "missing.html", check=False)
    assert bad.returncode != 0 and "missing.html: no such file" in bad.stderr and "Traceback" not in bad.stderr
    assert status(project)["mode"] == "serving"

    out = project.cli("maintenance", "on", "--page", "page.html", "--reason", "schema change")
    assert "maintenance on" in out.stderr
    code, headers, body = fetch(project, "/anything")
    assert code == 503 and body.decode() == PAGE
    assert headers["retry-after"] == "45" and headers["cache-control"] == "no-store"
    assert headers["content-type"].startswith("text/html")
    assert fetch(project, "/_changeover/health")[0] == 200      # the load balancer's check is not the page
    assert slow.result(30)[:1] == (200,)                        # in flight when it began: it finished
    st = status(project)
    assert st["mode"] == "maintenance" and st["maintenance"]["retry_after"] == 45
    assert st["maintenance"]["page"].endswith("page.html")
    assert "maintenance on" in project.cli("status").stdout
    commands.reload_proxy(config.locate(project.config))      # a new worker gets the mode before it listens
    assert fetch(project)[0] == 503 and status(project)["mode"] == "maintenance"

    # a deploy goes through: verified on its slot, users keep the page until `maintenance off`
    out = project.deploy("v2")
    assert "maintenance is on" in out.stderr
    assert status(project)["live"]["version"] == "v2"
    assert fetch(project)[0] == 503

    # --retry-after and the built-in page
    ctl(project).maintenance(True, retry_after=7)
    _, headers, _ = fetch(project)
    assert headers["retry-after"] == "7"

    users = Users(project.port, 5)
    until(lambda: users.load.failed > 20, what="users getting the page")
    ctl(project).maintenance(False)
    failed = users.load.failed
    until(lambda: users.load.ok > 50, what="users served again")
    summary = users.stop()
    assert summary["failed_by_version"].keys() <= {"proxy"} and users.load.failed >= failed
    assert all(e == "HTTP 503" for e in users.load.errors), users.load.errors[:5]   # answered, never lost
    code, headers, _ = fetch(project)
    assert code == 200 and headers["x-version"] == "v2"
    assert status(project)["mode"] == "serving"
    kinds = [r["kind"] for r in history(project) if r["id"] is None]
    assert kinds == ["maintenance_off", "maintenance_on", "maintenance_on"]


def test_the_proxy_keeps_the_mode_while_the_daemon_is_away(project: Project, pool: ThreadPoolExecutor,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    project.start_daemon()
    project.deployed("v1")

    # paused, SIGKILL: the worker holds on, also what arrives while no daemon runs
    ctl(project).pause(timeout=120)
    first = pool.submit(fetch, project)
    until(lambda: status(project)["pause"]["held"] == 1, what="a request held")
    project.kill_daemon(signal.SIGKILL)
    second = pool.submit(fetch, project)
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "maintenance:30")   # for the next daemon only
    project.start_daemon()
    monkeypatch.delenv("CHANGEOVER_TEST_STEP_DELAY")
    st = until(lambda: (s := status(project))["pause"] and s["pause"]["held"] == 2 and s, what="both held")
    assert st["mode"] == "paused" and not first.done() and not second.done()
    assert ctl(project).resume()["released"] == 2
    assert first.result(30)[0] == 200 and second.result(30)[0] == 200

    # SIGKILL between the state's write and the proxy's change: the next daemon applies the intent
    cli = background(project, "maintenance", "on")
    until(lambda: mode_in_state(project, "maintenance"), what="maintenance recorded")
    project.kill_daemon(signal.SIGKILL)
    cli.wait(30)
    assert fetch(project)[0] == 200
    project.start_daemon()
    assert fetch(project)[0] == 503
    assert status(project)["mode"] == "maintenance"

    # in maintenance, SIGTERM: the worker keeps answering with the page
    project.kill_daemon(signal.SIGTERM)
    assert fetch(project)[0] == 503
    project.start_daemon()
    assert status(project)["mode"] == "maintenance"
    ctl(project).maintenance(False)
    assert fetch(project)[0] == 200

    # paused, SIGTERM, and the timeout passes while no daemon runs: not paused again
    ctl(project).pause(timeout=1)
    project.kill_daemon(signal.SIGTERM)
    assert fetch(project)[0] == 200              # the proxy resumed at the timeout by itself
    project.start_daemon()
    assert fetch(project, timeout=5)[0] == 200
    assert status(project)["mode"] == "serving"
    rows = [r for r in history(project) if r["id"] is None]
    assert [r["kind"] for r in rows[:2]] == ["resumed", "paused"] and rows[0]["actor"] == "timeout"


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/ensure-services.sh)")
def test_haproxy_engine_serves_maintenance_and_refuses_pause_clearly(project: Project) -> None:
    project.write('engine = "haproxy"\n')
    (project.root / "page.html").write_text(PAGE)
    project.start_daemon()
    project.deployed("v1")
    p = project.cli("pause", check=False)
    assert p.returncode != 0 and 'engine = "haproxy"' in p.stderr and "Traceback" not in p.stderr
    assert [r for r in history(project) if r["id"] is None] == []      # refused before anything was recorded

    project.cli("maintenance", "on", "--page", "page.html", "--retry-after", "9")
    code, headers, body = fetch(project)
    assert (code, headers["retry-after"], headers["cache-control"]) == (503, "9", "no-store")
    assert body.decode() == PAGE.replace("\n", " ")    # HAProxy sends line breaks as spaces
    project.kill_daemon(signal.SIGKILL)
    assert fetch(project)[0] == 503               # HAProxy keeps the mode while no daemon runs
    project.start_daemon()
    assert status(project)["mode"] == "maintenance"
    # a reload: the new HAProxy worker loads the mode with its config, so no user reaches the app
    # in the moment before the daemon sets the variables again
    users = Users(project.port, 5)
    until(lambda: users.load.failed > 20, what="users getting the page")
    commands.reload_proxy(config.locate(project.config))
    time.sleep(0.5)
    summary = users.stop()
    assert users.load.ok == 0, f"{users.load.ok} request(s) reached the app during the reload: {summary}"
    assert all(e == "HTTP 503" for e in users.load.errors), users.load.errors[:5]
    code, headers, body = fetch(project)
    assert (code, headers["retry-after"], body.decode()) == (503, "9", PAGE.replace("\n", " "))
    ctl(project).maintenance(False)
    code, headers, _ = fetch(project)
    assert code == 200 and headers["x-version"] == "v1"


def test_config_keys_are_checked(tmp_path: Path) -> None:
    def load(proxy: str) -> config.Config:
        (tmp_path / "changeover.toml").write_text(f'[app]\ncommand = ["true"]\n[proxy]\n{proxy}\n')
        return config.load(tmp_path / "changeover.toml")

    (tmp_path / "down.html").write_text(PAGE)
    c = load('pause_timeout = "2m"\npause_max_held = 50\nmaintenance_page = "down.html"\nretry_after = 120')
    assert (c.proxy.pause_timeout, c.proxy.pause_max_held, c.proxy.retry_after) == (120.0, 50, 120)
    assert c.proxy.maintenance_page == str(tmp_path / "down.html")
    assert load("").proxy.pause_timeout == 30.0 and load("").proxy.maintenance_page == ""
    for bad, key in (('maintenance_page = "gone.html"', "proxy.maintenance_page"),
                     ('pause_timeout = "0s"', "proxy.pause_timeout"), ("retry_after = -1", "proxy.retry_after")):
        with pytest.raises(ConfigError) as e:
            load(bad)
        assert e.value.key == key and e.value.file
