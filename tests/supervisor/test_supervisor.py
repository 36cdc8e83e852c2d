"""The slot supervisor against real processes: start, readiness failures, crashes, stop, adopt."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from changeover.daemon import keeper, procs
from changeover.daemon.instances import InstanceRecord, SupervisorEvent
from changeover.daemon.supervisor import Supervisor
from changeover.errors import SlotStartError

from .conftest import Harness, group_gone, zombies


def get(port: int, path: str = "/") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5, trust_env=False)


async def wait_for(h: Harness, kind: str, count: int = 1, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while h.kinds().count(kind) < count:
        assert time.monotonic() < deadline, f"no {kind!r} event; got {h.kinds()}"
        await asyncio.sleep(0.05)


def test_start_two_instances_serve_and_stop(h: Harness) -> None:
    async def body() -> None:
        fds = len(os.listdir("/proc/self/fd"))
        sup = h.supervisor(instances=2)
        records = await sup.start_slot("blue", h.release("v1"))
        assert len(records) == 2 and sorted(r.index for r in records) == [0, 1]
        ups = sup.upstreams("blue")
        assert len({p for _, p in ups}) == 2
        for host, port in ups:
            r = await asyncio.to_thread(get, port)
            assert host == "127.0.0.1" and r.status_code == 200 and "hello from v1" in r.text
        for rec in records:
            assert procs.proc_start(rec.pid) == rec.proc_start
            assert os.getpgid(rec.pid) == rec.pid  # own process group / session
        assert sup.release("blue") is not None and sup.release("blue").version == "v1"  # type: ignore[union-attr]
        assert h.kinds("blue") == ["started", "started", "ready", "ready"]
        # Log files per release and instance, written by the app itself.
        paths = sup.log_paths("blue")
        assert paths == [h.tmp / "logs" / "blue" / "v1.0.log", h.tmp / "logs" / "blue" / "v1.1.log"]
        for p in paths:
            assert "listening on 127.0.0.1" in p.read_text()
        with pytest.raises(SlotStartError, match="already running release v1"):
            await sup.start_slot("blue", h.release("v2"))
        await sup.stop_slot("blue")
        assert h.kinds("blue")[-2:] == ["stopped", "stopped"]
        assert all("exited with code 0" in e.detail for e in h.events if e.kind == "stopped")
        assert all(group_gone(r.pid) for r in records)
        assert sup.upstreams("blue") == [] and sup.records("blue") == [] and sup.release("blue") is None
        await sup.close()
        assert len(os.listdir("/proc/self/fd")) <= fds  # log files and sockets all closed
        assert zombies() == []

    asyncio.run(body())


def test_health_failure_names_error_and_log_tail_and_leaves_nothing(h: Harness) -> None:
    async def body() -> None:
        sup = h.supervisor(instances=2, ready_timeout=1.5)
        with pytest.raises(SlotStartError) as exc:
            await sup.start_slot("green", h.release("v2", env={"FAULT_HEALTH": "fail"}))
        msg = str(exc.value)
        assert "release v2 did not become ready" in msg
        assert "not ready within 1.5s" in msg
        assert "HTTP 503" in msg and "failing" in msg          # status and body snippet
        assert "example app v2 listening on" in msg            # log tail
        assert "Traceback" not in msg
        assert h.started and all(group_gone(pid) for pid, _ in h.started)
        assert sup.records("green") == [] and sup.upstreams("green") == []
        # The slot is free again: a good release starts.
        await sup.start_slot("green", h.release("v3"))
        await sup.stop_slot("green")

    asyncio.run(body())


def test_port_taken_before_the_app_binds_is_retried_elsewhere(h: Harness,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = procs.free_port
    ports = iter([taken])
    monkeypatch.setattr(procs, "free_port", lambda exclude=frozenset(): next(ports, None) or real(exclude))

    async def body() -> None:
        sup = h.supervisor()
        [rec] = await sup.start_slot("blue", h.release())
        assert rec.port != taken
        assert "Address already in use" in Path(rec.log_path).read_text()
        assert h.kinds() == ["started", "started", "ready"]
        await sup.stop_slot("blue")

    try:
        asyncio.run(body())
    finally:
        squatter.close()


def test_early_exit_fails_fast_with_exit_code(h: Harness) -> None:
    async def body() -> None:
        sup = h.supervisor(ready_timeout=60)
        t0 = time.monotonic()
        with pytest.raises(SlotStartError) as exc:
            await sup.start_slot("blue", h.release("v1", env={"FAULT_EXIT": "1"}))
        assert time.monotonic() - t0 < 20  # far below ready_timeout: the exit is noticed
        msg = str(exc.value)
        assert "exited with code 1" in msg and "exiting on purpose" in msg
        assert all(group_gone(pid) for pid, _ in h.started)

    asyncio.run(body())


def test_one_failing_instance_fails_the_slot_at_once_and_kills_the_others(h: Harness) -> None:
    # The first instance to get the lock serves (slowly: it never becomes ready here), the other exits 7.
    script = f'mkdir lock 2>/dev/null && exec "{sys.executable}" "{EXAMPLE}" $PORT || exit 7'

    async def body() -> None:
        sup = h.supervisor(instances=2, ready_timeout=60)
        t0 = time.monotonic()
        with pytest.raises(SlotStartError, match="exited with code 7"):
            await sup.start_slot("blue", h.release(command=("/bin/sh", "-c", script), path=h.tmp,
                                                   env={"FAULT_START_DELAY": "30"}))
        assert time.monotonic() - t0 < 20
        assert len(h.started) == 2 and all(group_gone(pid) for pid, _ in h.started)

    asyncio.run(body())


def test_passwords_in_the_log_tail_are_masked(h: Harness) -> None:
    h.script("leaky.sh", '#!/bin/sh\necho "connecting to postgres://app:hunter2@db/prod"\nexit 2\n')

    async def body() -> None:
        sup = h.supervisor()
        with pytest.raises(SlotStartError) as exc:
            await sup.start_slot("blue", h.release(command=("./leaky.sh", "token=s3cret"), path=h.tmp))
        msg = str(exc.value)
        assert "exited with code 2" in msg and "postgres://app:***@db/prod" in msg
        assert "hunter2" not in msg and "s3cret" not in msg
        log = (h.tmp / "logs" / "blue" / "v1.0.log").read_text()
        assert "token=***" in log and "s3cret" not in log  # our header line masks the argv

    asyncio.run(body())


def test_bad_release_path_and_command_are_clear_errors(h: Harness) -> None:
    async def body() -> None:
        sup = h.supervisor()
        with pytest.raises(SlotStartError, match=r"release directory .*nope does not exist"):
            await sup.start_slot("blue", h.release(path=h.tmp / "nope"))
        f = h.tmp / "file"
        f.write_text("")
        with pytest.raises(SlotStartError, match="is not a directory"):
            await sup.start_slot("blue", h.release(path=f))
        with pytest.raises(SlotStartError, match=r"command 'no-such-binary-xyz' not found on PATH"):
            await sup.start_slot("blue", h.release(command=("no-such-binary-xyz", "$PORT")))
        with pytest.raises(SlotStartError, match=r"command './missing.sh' not found"):
            await sup.start_slot("blue", h.release(command=("./missing.sh",), path=h.tmp))
        (h.tmp / "noexec.sh").write_text("#!/bin/sh\n")
        with pytest.raises(SlotStartError, match="is not an executable file"):
            await sup.start_slot("blue", h.release(command=("./noexec.sh",), path=h.tmp))
        with pytest.raises(SlotStartError, match="invalid environment variable name 'A=B'"):
            await sup.start_slot("blue", h.release(env={"A=B": "x"}))
        with pytest.raises(SlotStartError, match="environment variable N must be a string"):
            await sup.start_slot("blue", h.release(env={"N": 1}))  # type: ignore[dict-item]
        with pytest.raises(SlotStartError, match="invalid command argument"):
            await sup.start_slot("blue", h.release(command=(sys.executable, "a\0b")))
        h.script("noshebang", "echo hi\n")
        with pytest.raises(SlotStartError, match=r"cannot start './noshebang' .*Exec format error"):
            await sup.start_slot("blue", h.release(command=("./noshebang",), path=h.tmp))
        with pytest.raises(SlotStartError, match="invalid slot name"):
            await sup.start_slot("../x", h.release())
        assert h.kinds() == [] and sup.records("blue") == []

    asyncio.run(body())


def test_shell_script_command_and_port_substitution(h: Harness) -> None:
    # A wrapper that forks the real server (no exec): stop must reach the whole process group.
    h.script("run.sh", f'#!/bin/sh\necho "wrapper port=$PORT arg=$1"\n"{sys.executable}" "{EXAMPLE}" "$1" &\n'
             "wait\n")

    async def body() -> None:
        sup = h.supervisor()
        [rec] = await sup.start_slot("blue", h.release(command=("./run.sh", "${PORT}"), path=h.tmp))
        r = await asyncio.to_thread(get, rec.port, "/health")
        assert r.status_code == 200
        assert f"wrapper port={rec.port} arg={rec.port}" in Path(rec.log_path).read_text()
        await sup.stop_slot("blue", stop_timeout=5)
        assert group_gone(rec.pid)

    asyncio.run(body())


def test_crash_is_reported_and_restarted(h: Harness) -> None:
    fault = h.tmp / "fault.json"

    async def body() -> None:
        sup = h.supervisor()
        [rec] = await sup.start_slot("blue", h.release(env={"FAULT_FILE": str(fault)}))
        fault.write_text(json.dumps({"crash": True}))
        with pytest.raises(httpx.HTTPError):
            await asyncio.to_thread(get, rec.port)
        fault.write_text("{}")  # the restarted process must not crash again
        await wait_for(h, "crashed")
        assert sup.upstreams("blue") == []  # out of rotation while it restarts
        await wait_for(h, "restarted")
        kinds = h.kinds()
        assert kinds[kinds.index("crashed"):] == ["crashed", "restarting", "started", "restarted"]
        crashed = next(e for e in h.events if e.kind == "crashed")
        assert "exited with code 3" in crashed.detail and crashed.instance == rec
        [(_, port)] = sup.upstreams("blue")
        r = await asyncio.to_thread(get, port)
        assert r.status_code == 200
        [new] = sup.records("blue")
        assert new.pid != rec.pid and new.port == rec.port  # same port: it was free
        assert "starting" in Path(new.log_path).read_text()
        await sup.stop_slot("blue")
        assert group_gone(new.pid)

    asyncio.run(body())


def test_crash_loop_backs_off_and_recovers(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper, "BACKOFF_START", 0.05)
    monkeypatch.setattr(keeper, "BACKOFF_CAP", 0.2)
    fault = h.tmp / "fault.json"

    async def body() -> None:
        sup = h.supervisor()
        [rec] = await sup.start_slot("blue", h.release(env={"FAULT_FILE": str(fault)}))
        fault.write_text(json.dumps({"crash": True}))  # every restart dies on its first health check
        with pytest.raises(httpx.HTTPError):
            await asyncio.to_thread(get, rec.port)
        await wait_for(h, "restarting", 5)
        delays = [e.detail.rsplit("restarting in ", 1)[1] for e in h.events if e.kind == "restarting"]
        assert delays[:5] == ["0.05s", "0.1s", "0.2s", "0.2s", "0.2s"]
        assert any("not ready after restart" in e.detail for e in h.events if e.kind == "crashed")
        assert "gave_up" not in h.kinds() and sup.upstreams("blue") == []
        fault.write_text("{}")  # the cause goes away: the next attempt succeeds
        await wait_for(h, "restarted")
        [(_, port)] = sup.upstreams("blue")
        assert (await asyncio.to_thread(get, port)).status_code == 200
        await sup.stop_slot("blue")

    asyncio.run(body())


def test_restart_moves_to_a_new_port_when_the_old_one_is_taken(h: Harness) -> None:
    fault = h.tmp / "fault.json"
    squatter = socket.socket()

    def on_event(ev: SupervisorEvent) -> None:
        h.on_event(ev)
        if ev.kind == "crashed" and ev.instance is not None:
            # Someone grabs the port while the instance is down.
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", ev.instance.port))
            squatter.listen()
            fault.write_text("{}")

    async def body() -> None:
        sup = h.supervisor()
        sup.on_event = on_event
        [rec] = await sup.start_slot("blue", h.release(env={"FAULT_FILE": str(fault)}))
        fault.write_text(json.dumps({"crash": True}))
        with pytest.raises(httpx.HTTPError):
            await asyncio.to_thread(get, rec.port)
        await wait_for(h, "restarted")
        [(_, port)] = sup.upstreams("blue")
        assert port != rec.port
        assert (await asyncio.to_thread(get, port)).status_code == 200
        await sup.stop_slot("blue")

    try:
        asyncio.run(body())
    finally:
        squatter.close()


def test_gives_up_when_the_release_is_gone(h: Harness) -> None:
    rel = h.tmp / "release"
    rel.mkdir()
    fault = h.tmp / "fault.json"

    async def body() -> None:
        sup = h.supervisor()
        [rec] = await sup.start_slot("blue", h.release(path=rel, env={"FAULT_FILE": str(fault)}))
        rel.rmdir()  # the deploy directory was cleaned up under the running app
        fault.write_text(json.dumps({"crash": True}))
        with pytest.raises(httpx.HTTPError):
            await asyncio.to_thread(get, rec.port)
        await wait_for(h, "gave_up")
        gave_up = next(e for e in h.events if e.kind == "gave_up")
        assert "does not exist" in gave_up.detail
        assert sup.upstreams("blue") == [] and sup.records("blue") == []
        await sup.stop_slot("blue")
        assert sup.release("blue") is None

    asyncio.run(body())


def test_backgrounding_wrapper_gets_a_hint_and_its_children_are_killed(h: Harness) -> None:
    async def body() -> None:
        sup = h.supervisor()
        cmd = ("/bin/sh", "-c", f'"{sys.executable}" "{EXAMPLE}" $PORT &')
        with pytest.raises(SlotStartError, match="must stay in the foreground") as exc:
            await sup.start_slot("blue", h.release(command=cmd))
        assert "exited with code 0" in str(exc.value)
        [(pid, _)] = h.started
        for _ in range(100):  # the backgrounded server was in the group: killed with it
            if group_gone(pid):
                break
            await asyncio.sleep(0.05)
        assert group_gone(pid)

    asyncio.run(body())


def test_health_hints_for_redirects(h: Harness) -> None:
    async def body() -> None:
        sup = h.supervisor(ready_timeout=1.0, health_path="/nope")
        with pytest.raises(SlotStartError, match=r"HTTP 404 .*is health_path '/nope' right\?"):
            await sup.start_slot("blue", h.release())

    asyncio.run(body())


def test_running_instance_log_is_rotated(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper, "LOG_CHECK_EVERY", 0.05)

    async def body() -> None:
        sup = h.supervisor()
        sup.log_max_bytes = 2000
        [rec] = await sup.start_slot("blue", h.release(env={"APP_ACCESS_LOG": "1"}))
        log = Path(rec.log_path)
        for _ in range(40):  # one access-log line each
            assert (await asyncio.to_thread(get, rec.port)).status_code == 200
        for _ in range(200):
            if Path(f"{log}.1").exists():
                break
            await asyncio.sleep(0.05)
        assert "listening on" in Path(f"{log}.1").read_text()
        assert (await asyncio.to_thread(get, rec.port, "/after-rotation")).status_code == 404
        for _ in range(100):
            if "/after-rotation" in log.read_text():
                break
            await asyncio.sleep(0.05)
        assert "/after-rotation" in log.read_text() and log.stat().st_size < 2000
        await sup.stop_slot("blue")

    asyncio.run(body())


def test_stop_escalates_to_sigkill(h: Harness) -> None:
    h.script("stubborn.py", STUBBORN)

    async def body() -> None:
        sup = h.supervisor(stop_timeout=30)
        [rec] = await sup.start_slot("blue", h.release(command=(sys.executable, "stubborn.py"), path=h.tmp))
        t0 = time.monotonic()
        await sup.stop_slot("blue", stop_timeout=0.5)
        assert time.monotonic() - t0 < 10
        stopped = [e for e in h.events if e.kind == "stopped"]
        assert len(stopped) == 1 and "SIGKILL" in stopped[0].detail
        assert group_gone(rec.pid)
        assert "ignoring SIGTERM" in Path(rec.log_path).read_text()
        assert zombies() == []

    asyncio.run(body())


def test_adopt_after_daemon_restart(h: Harness) -> None:
    async def body() -> None:
        old = h.supervisor(instances=3)
        records = await old.start_slot("blue", h.release("v1"))
        await old.close()  # the daemon goes away; the app keeps serving
        for rec in records:
            assert (await asyncio.to_thread(get, rec.port)).status_code == 200
        # Persisted as JSON and read back, as the daemon does.
        records = [InstanceRecord.from_json(json.loads(json.dumps(r.to_json()))) for r in records]
        records.sort(key=lambda r: r.index)
        # While no daemon watches, instance 2 dies; and a record's pid now belongs to another
        # process (here: the test itself), which must never be adopted nor signalled.
        os.killpg(records[2].pid, 9)
        os.waitpid(records[2].pid, 0)
        me = os.getpid()
        reused = InstanceRecord(3, me, procs.free_port(), (procs.proc_start(me) or 0) + 1,
                                str(h.tmp / "logs" / "blue" / "v1.3.log"))
        new = h.supervisor(instances=5)  # and instance 4 was never recorded: it is started too
        h.events.clear()
        alive = new.adopt("blue", h.release("v1"), [*records, reused])
        assert alive == records[:2]
        assert h.kinds()[:4] == ["adopted", "adopted", "lost", "lost"]
        assert sorted(p for _, p in new.upstreams("blue")) == sorted(r.port for r in records[:2])
        # The slot is made whole again: the lost and the missing instances are started.
        await wait_for(h, "restarted", 3)
        assert len(new.upstreams("blue")) == 5
        assert (h.tmp / "logs" / "blue" / "v1.4.log").exists()
        # An adopted instance (watched through /proc, not waitpid) crashes and is restarted.
        os.killpg(records[0].pid, 9)
        await wait_for(h, "restarted", 4)
        crashed = next(e for e in h.events if e.kind == "crashed")
        assert crashed.instance is not None and crashed.instance.pid == records[0].pid
        assert "SIGKILL" in crashed.detail or "unknown" in crashed.detail
        assert len(new.upstreams("blue")) == 5
        for _, port in new.upstreams("blue"):
            assert (await asyncio.to_thread(get, port)).status_code == 200
        live = new.records("blue")
        assert len(live) == 5 and me not in {r.pid for r in live}
        await new.stop_slot("blue", stop_timeout=5)
        assert all(group_gone(r.pid) for r in live)
        assert zombies() == []

    asyncio.run(body())


def test_adopt_nothing_alive(h: Harness) -> None:
    async def body() -> None:
        sup: Supervisor = h.supervisor()
        assert sup.adopt("green", h.release(), [InstanceRecord(0, os.getpid(), 5, 1, "z.log")]) == []
        assert h.kinds() == ["lost"] and sup.release("green") is None

    asyncio.run(body())


def test_instance_record_json() -> None:
    rec = InstanceRecord(1, 1234, 8080, 99, "/tmp/x.log")
    assert InstanceRecord.from_json(rec.to_json()) == rec
    with pytest.raises(ValueError, match="invalid instance record"):
        InstanceRecord.from_json({"index": 0, "pid": "x"})


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "app" / "server.py"

STUBBORN = """\
import http.server, os, signal, sys
signal.signal(signal.SIGTERM, lambda *a: print("ignoring SIGTERM", flush=True))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def test_unrecorded_instances_are_found_by_their_tag_and_stopped(h: Harness) -> None:
    """A daemon killed between spawning an instance and recording its pid: the next one finds the
    process by its environment tag. Other slots and other projects' processes are left alone."""
    async def body() -> None:
        sup = h.supervisor(instances=2)
        kept = await sup.start_slot("blue", h.release("v1"))
        lost = await sup.start_slot("green", h.release("v2"))  # never recorded, as if the daemon died
        other = h.supervisor()
        other.owner = str(h.tmp / "another-project")
        foreign = await other.start_slot("green", h.release("v3"))
        await sup.close()
        await other.close()
        assert procs.tagged_groups(sup.owner, ["blue"]) == {r.pid for r in kept}
        assert procs.tagged_groups(sup.owner, ["green"]) == {r.pid for r in lost}
        assert procs.kill_orphans(sup.owner, ["green"]) == sorted(r.pid for r in lost)
        assert all(group_gone(r.pid) for r in lost)
        for rec in kept + foreign:
            assert (await asyncio.to_thread(get, rec.port)).status_code == 200
        assert procs.kill_orphans(sup.owner, []) == []
        assert procs.kill_orphans(sup.owner, ["blue", "green"]) == sorted(r.pid for r in kept)
        assert procs.kill_orphans(other.owner, ["green"]) == [foreign[0].pid]
        assert procs.tagged_groups(sup.owner, ["blue", "green"]) == set()

    asyncio.run(body())
