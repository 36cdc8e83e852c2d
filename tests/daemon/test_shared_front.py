"""Two projects on one port: two changeover.toml, two daemons, two real apps, one shared front.

Each project deploys and rolls back under load from the other's users (0 failed requests for
them); a daemon cannot reach the other's routes over the wire; a taken host name is a clear error;
a daemon killed with SIGKILL leaves both projects serving and adopts its routes when it comes
back; the front itself is handed over to a new process without a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from changeover import rpc
from changeover.errors import ChangeoverError
from changeover.proxy.tls import self_signed
from changeover.state import State
from tests.daemon.harness import Project, free_port


@dataclass
class HostLoad:
    """Keep-alive GETs with a given Host header, counted by the X-Version that answered."""
    port: int
    host: str
    connections: int = 8
    tls: ssl.SSLContext | None = None     # HTTPS, the certificate checked for `host` (SNI)
    ok: int = 0
    failed: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    async def _conn(self, done: asyncio.Event) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        req = f"GET / HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        while not done.is_set():
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(
                        "127.0.0.1", self.port, ssl=self.tls, server_hostname=self.host if self.tls else None), 5)
                reader, writer = conn
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, ssl.SSLError) as e:
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}")
                conn = None
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                self.ok += 1
                self.versions[headers.get("x-version", "?")] += 1
            else:
                self.failed += 1
                self.errors.append(f"HTTP {status}")
            await asyncio.sleep(0.002)
        if conn is not None:
            conn[1].close()

    async def run_until(self, done: asyncio.Event) -> None:
        await asyncio.gather(*(self._conn(done) for _ in range(self.connections)))


def _shared(front: Path, *hosts: str, tls: str = "") -> str:
    return f'hosts = {json.dumps(list(hosts))}\nshared = true\nfront_socket = "{front}"\n{tls}'


def _tls(p: Project, tls_port: int, *names: str) -> str:
    """[proxy.tls] with a self-signed certificate of the project's own names (key in the file)."""
    pem = self_signed(list(names), p.root / "certs")
    return f'\n[proxy.tls]\nlisten = "127.0.0.1:{tls_port}"\ncert = "{pem}"\nkey = "{pem}"\n'


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, Project, Path]]:
    """Two projects on one port, both deployed once (a1, b1); the tests run in order on them."""
    tmp = tmp_path_factory.mktemp("shared")
    port = free_port()
    front = tmp / "front" / "front.sock"
    front.parent.mkdir()
    a = Project(tmp / "a", port=port)
    b = Project(tmp / "b", port=port)
    tls_port = free_port()
    for p, hosts, names in ((a, ("shop.test", "www.shop.test"), ("shop.test", "www.shop.test")),
                            (b, ("*.blog.test",), ("*.blog.test",))):
        p.root.mkdir()
        p.tls = _tls(p, tls_port, *names)      # type: ignore[attr-defined]
        p.tls_port = tls_port                  # type: ignore[attr-defined]
        p.write(_shared(front, *hosts, tls=p.tls))  # type: ignore[attr-defined]
    try:
        a.start_daemon()
        b.start_daemon()
        a.deployed("a1")
        b.deployed("b1")
        yield a, b, front
    finally:
        pid = _front_pid(front)
        for p in (a, b):
            p.teardown()
        if pid:                          # detaching both stopped it; nothing may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _front_pid(front: Path) -> int | None:
    with contextlib.suppress(Exception):
        return int(asyncio.run(rpc.call(front, "ping", {}, timeout=2))["pid"])
    return None


def _version(port: int, host: str) -> str | None:
    async def go() -> str | None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await r.read()
        w.close()
        head = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        if int(head[0].split()[1]) != 200:
            return None
        return {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:])}.get("x-version")
    return asyncio.run(go())


def _under_load(a: Project, b: Project, action: Callable[[], Awaitable[None]],
                *more: HostLoad) -> tuple[HostLoad, HostLoad]:
    """Both projects' users hammer the port (and `more`) while `action` runs."""
    async def go() -> tuple[HostLoad, HostLoad]:
        la, lb = HostLoad(a.port, "shop.test"), HostLoad(a.port, "en.blog.test")
        done = asyncio.Event()
        runners = [asyncio.create_task(x.run_until(done)) for x in (la, lb, *more)]
        await asyncio.sleep(0.2)
        try:
            await action()
            await asyncio.sleep(0.2)
        finally:
            done.set()
            await asyncio.gather(*runners)
        return la, lb
    return asyncio.run(go())


def _last_start(p: Project) -> dict[str, object]:
    st = State(p.root / ".changeover" / "state.db", readonly=True)
    try:
        return next(e for e in st.events(limit=200) if e["kind"] == "daemon.start")
    finally:
        st.close()


def test_two_projects_deploy_and_roll_back_without_failing_each_other(pair: tuple[Project, Project, Path]) -> None:
    a, b, _ = pair
    port = a.port
    assert _version(port, "shop.test") == "a1" and _version(port, "WWW.Shop.Test:80") == "a1"
    assert _version(port, "x.blog.test") == "b1"
    assert _version(port, "other.test") is None           # no project serves it: 404
    status = a.status()
    assert status["proxy"]["shared"] is True and status["proxy"]["hosts"] == ["shop.test", "www.shop.test"]

    async def deploys() -> None:
        await asyncio.to_thread(a.deploy, "a2")           # b's users keep getting b1 meanwhile
        await asyncio.to_thread(b.deploy, "b2")
        await asyncio.to_thread(a.cli, "rollback", "--json")   # warm: back to a1, and b's users see nothing
        await asyncio.to_thread(b.cli, "rollback", "--json")

    # the same over HTTPS on the shared 443-style listener: each name gets its own project's certificate
    trust = ssl.create_default_context()
    for p in (a, b):
        trust.load_verify_locations(str(next((p.root / "certs").iterdir())))
    sa, sb = HostLoad(a.tls_port, "shop.test", 4, trust), HostLoad(a.tls_port, "en.blog.test", 4, trust)  # type: ignore[attr-defined]
    la, lb = _under_load(a, b, deploys, sa, sb)
    for load in (la, lb, sa, sb):
        assert load.failed == 0, (load.host, load.tls is not None, load.errors[:5])
    assert set(la.versions) == {"a1", "a2"} and set(lb.versions) == {"b1", "b2"}, (la.versions, lb.versions)
    assert set(sa.versions) == {"a1", "a2"} and set(sb.versions) == {"b1", "b2"}, (sa.versions, sb.versions)
    assert la.ok > 100 and lb.ok > 100 and sa.ok > 20 and sb.ok > 20
    assert _version(port, "shop.test") == "a1" and _version(port, "x.blog.test") == "b1"


def test_a_daemon_cannot_touch_the_other_projects_routes(pair: tuple[Project, Project, Path]) -> None:
    a, b, front = pair
    key_b = (b.root / ".changeover" / "front.key").read_text().strip()
    assert (os.stat(b.root / ".changeover" / "front.key").st_mode & 0o777) == 0o600
    before = _version(a.port, "shop.test"), _version(a.port, "x.blog.test")

    async def attempts() -> list[str]:
        out = []
        for op, args in (
            ("switch", {"key": key_b, "slot": "green@" + _site_of(a)}),     # another site's pool by name
            ("switch", {"slot": None}),                                      # no key
            ("switch", {"key": "0" * 64, "slot": None}),                     # a guessed key
            ("detach", {"key": "0" * 64}),
            ("attach", {"key": key_b, "project": str(a.root / ".changeover"), "hosts": ["evil.test"]}),
            ("attach", {"key": key_b, "project": str(b.root / ".changeover"), "hosts": ["shop.test"],
                        "config": str(b.config)}),
        ):
            try:
                await rpc.call(front, op, args, timeout=5)
            except ChangeoverError as e:
                out.append(str(e))
            else:
                out.append("ACCEPTED")
        return out

    refusals = asyncio.run(attempts())
    assert "ACCEPTED" not in refusals, refusals
    assert "without '@'" in refusals[0]
    assert all("refused" in r for r in refusals[1:5]), refusals
    assert "shop.test" in refusals[5] and str(a.config) in refusals[5] and str(b.config) in refusals[5]
    assert (_version(a.port, "shop.test"), _version(a.port, "x.blog.test")) == before


def _site_of(p: Project) -> str:
    import hashlib
    return hashlib.sha256(str(p.root / ".changeover").encode()).hexdigest()[:12]


def test_claiming_a_taken_host_is_a_clear_error(pair: tuple[Project, Project, Path]) -> None:
    a, _, front = pair
    c = Project(a.root.parent / "c", port=a.port)
    c.root.mkdir()
    c.write(_shared(front, "api.test", "www.shop.test"))
    serve = c.cli("serve", check=False, timeout=30)
    try:
        assert serve.returncode == 2
        msg = serve.stdout + serve.stderr
        assert "www.shop.test" in msg and str(a.config) in msg and str(c.config) in msg, msg
        assert "Traceback" not in msg
        assert _version(a.port, "www.shop.test") is not None     # the owner still serves it
    finally:
        c.teardown()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_daemon_stopped_leaves_both_serving_and_adopts_its_routes(
        pair: tuple[Project, Project, Path], sig: signal.Signals) -> None:
    a, b, _ = pair
    was = _version(a.port, "shop.test")

    async def stop_and_restart() -> None:
        await asyncio.to_thread(a.kill_daemon, sig)
        await asyncio.sleep(0.5)                          # a's users are served with no daemon
        await asyncio.to_thread(a.start_daemon)
        if sig == signal.SIGKILL:                         # and it drives its routes again
            await asyncio.to_thread(a.cli, "rollback", "--json")

    la, lb = _under_load(a, b, stop_and_restart)
    assert la.failed == 0 and lb.failed == 0, (la.errors[:5], lb.errors[:5])
    assert len(la.versions) == (2 if sig == signal.SIGKILL else 1) and set(lb.versions) == {"b1"}
    assert _last_start(a)["proxy"] == "adopted"
    now = _version(a.port, "shop.test")
    assert (now != was) == (sig == signal.SIGKILL) and a.status()["live"]["version"] == now


def test_killed_inside_the_switch_the_front_and_the_state_agree(
        pair: tuple[Project, Project, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL while the switch step holds (it acted on the front, it is not recorded done): the
    next daemon adopts what the front serves, finishes the deploy, and the other project's users
    notice nothing."""
    a, b, _ = pair
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "switch:30")
    a.kill_daemon(signal.SIGTERM)
    a.start_daemon()
    monkeypatch.delenv("CHANGEOVER_TEST_STEP_DELAY")
    blog = _version(a.port, "x.blog.test")

    async def kill_in_switch() -> None:
        proc = subprocess.Popen([sys.executable, "-m", "changeover", "deploy", "a3", "--path", str(a.release("a3")),
                                 "-c", str(a.config)], cwd=a.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        await asyncio.to_thread(a.wait_for_step, "switch")
        for _ in range(200):                      # the step's row is written before it acts
            if await asyncio.to_thread(_version, a.port, "shop.test") == "a3":
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(a.kill_daemon, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 60)
        await asyncio.to_thread(a.start_daemon)

    la, lb = _under_load(a, b, kill_in_switch)
    assert la.failed == 0 and lb.failed == 0, (la.errors[:5], lb.errors[:5])
    assert set(lb.versions) == {blog} and "a3" in la.versions
    assert _version(a.port, "shop.test") == "a3" and _version(a.port, "x.blog.test") == blog
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = json.loads(a.cli("history", "--json").stdout)[0]
        if h["state"] != "running":
            break
        time.sleep(0.2)
    assert h["version"] == "a3" and h["state"] == "succeeded", h
    assert a.status()["live"]["version"] == "a3"


def test_the_front_killed_is_started_again_with_every_projects_routes(pair: tuple[Project, Project, Path]) -> None:
    a, b, front = pair
    old = _front_pid(front)
    want = _version(a.port, "shop.test"), _version(a.port, "x.blog.test")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:            # a daemon's watchdog starts it again (~1.5 s)
        pid = _front_pid(front)
        if pid is not None and pid != old:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no daemon started the front again")
    for _ in range(50):
        if (_version(a.port, "shop.test"), _version(a.port, "x.blog.test")) == want:
            break
        time.sleep(0.1)
    assert (_version(a.port, "shop.test"), _version(a.port, "x.blog.test")) == want
    b.cli("rollback", "--json")                     # both daemons drive the new front
    assert _version(a.port, "x.blog.test") != want[1]


def test_front_handover_without_failed_requests(pair: tuple[Project, Project, Path]) -> None:
    a, b, front = pair
    before = _front_pid(front)
    out: list[str] = []

    async def handover() -> None:
        p = await asyncio.to_thread(a.cli, "front", "handover", "--json")
        out.append(p.stdout)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(b.cli, "rollback", "--json")   # the new front takes switches

    la, lb = _under_load(a, b, handover)
    after = _front_pid(front)
    assert after != before and json.loads(out[0])["pid"] == after
    assert la.failed == 0 and lb.failed == 0, (la.errors[:5], lb.errors[:5])
    assert len(lb.versions) == 2
    st = json.loads(a.cli("front", "status", "--json").stdout)
    assert st["pid"] == after and len(st["sites"]) == 2


def test_pause_and_maintenance_of_one_project_leave_the_other_flowing(pair: tuple[Project, Project, Path]) -> None:
    a, _, _ = pair
    blog, shop = _version(a.port, "x.blog.test"), _version(a.port, "shop.test")

    async def held_while_paused() -> tuple[str | None, list[str | None]]:
        await asyncio.to_thread(a.cli, "pause", "--timeout", "20s")
        held = asyncio.create_task(asyncio.to_thread(_version, a.port, "shop.test"))
        others = [await asyncio.to_thread(_version, a.port, "x.blog.test") for _ in range(3)]
        await asyncio.sleep(0.2)
        assert not held.done(), "a paused project's request must be held"
        await asyncio.to_thread(a.cli, "resume")
        return await asyncio.wait_for(held, 10), others

    got, others = asyncio.run(held_while_paused())
    assert got == shop and others == [blog] * 3
    a.cli("maintenance", "on")
    try:
        assert _version(a.port, "shop.test") is None and _version(a.port, "x.blog.test") == blog
        assert a.status().get("maintenance")
    finally:
        a.cli("maintenance", "off")
    assert _version(a.port, "shop.test") == shop


def test_reload_with_new_host_names_re_attaches(pair: tuple[Project, Project, Path]) -> None:
    a, b, _ = pair
    served = _version(a.port, "x.blog.test")
    b.write(_shared(b.config.parent.parent / "front" / "front.sock", "*.blog.test", "news.test",
                    tls=b.tls))  # type: ignore[attr-defined]
    b.cli("reload")
    assert _version(a.port, "news.test") == served and _version(a.port, "x.blog.test") == served
    b.write(_shared(b.config.parent.parent / "front" / "front.sock", "*.blog.test", "shop.test",
                    tls=b.tls))  # type: ignore[attr-defined]
    refused = b.cli("reload", check=False)
    assert refused.returncode != 0 and str(a.config) in refused.stdout + refused.stderr
    assert _version(a.port, "shop.test") is not None and _version(a.port, "news.test") == served
    human = b.cli("status").stdout
    assert "hosts: *.blog.test" in human and "shared front" in human


def test_down_of_one_project_leaves_the_other_serving(pair: tuple[Project, Project, Path]) -> None:
    a, _, front = pair
    served = _version(a.port, "x.blog.test")
    a.cli("down")
    assert a.daemon is not None
    a.daemon.wait(timeout=30)
    a.daemon = None
    assert _version(a.port, "shop.test") is None           # its names left the front
    assert _version(a.port, "x.blog.test") == served
    sites = asyncio.run(rpc.call(front, "ping", {}, timeout=2))["sites"]
    assert len(sites) == 1 and "*.blog.test" in sites[0]["hosts"] and "shop.test" not in sites[0]["hosts"]
