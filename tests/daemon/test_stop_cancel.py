"""The daemon acts on SIGTERM and `down` whatever its background loops are doing.

In process: a real `Daemon` (state, supervisor, control socket) on the fake data plane, whose
calls are made to hang or to drop a cancellation the way Python 3.11's `asyncio.wait_for` does
when the cancel lands as its inner call finishes (CPython gh-86296). Before, the daemon cancelled
its proxy watchdog once and awaited it: such a drop kept it from ever stopping (no "daemon
stopping", the deploy went on, `down` answered and the process stayed). And the control-socket
client (`rpc.stream`) must not drop that cancel itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

from changeover import config as config_mod
from changeover import rpc
from changeover.daemon import cancel, server
from changeover.proxy.fake import FakeControl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "app" / "server.py"
STOP_WITHIN = 5.0   # seconds: "promptly", with room for a loaded machine


def write_config(root: Path) -> Path:
    cfg = root / "changeover.toml"
    cfg.write_text(f"""
[app]
command = [{json.dumps(sys.executable)}, "server.py", "$PORT"]
health_path = "/health"

[proxy]
listen = "127.0.0.1:9"

[dashboard]
listen = ""

[monitor]
observe = "0s"
metrics_listen = ""
""")
    return cfg


class Proxy(FakeControl):
    """The fake data plane, running; `hang` makes a call wait until cancelled, `drop` makes that
    wait swallow its first cancel and return as if the answer had just come."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, running=True, **kwargs)
        self.hang: set[str] = set()
        self.drop = False
        self.inside: dict[str, asyncio.Event] = {}

    async def _hold(self, op: str) -> None:
        self.inside.setdefault(op, asyncio.Event()).set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            if not self.drop:
                raise
            self.drop = False   # wait_for's drop: the result is returned, the cancel is gone

    def entered(self, op: str) -> asyncio.Event:
        return self.inside.setdefault(op, asyncio.Event())

    async def ping(self) -> dict[str, Any] | None:
        if "ping" in self.hang:
            await self._hold("ping")
        return await super().ping()

    async def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        if "set_slot" in self.hang:
            await self._hold("set_slot")
        await super().set_slot(slot, upstreams)

    async def set_version(self, slot: str, version: str | None) -> None:
        if "set_version" in self.hang:
            await self._hold("set_version")
        await super().set_version(slot, version)


async def _daemon(root: Path, proxy: Proxy,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[server.Daemon, asyncio.Task[None]]:
    config = config_mod.load(write_config(root))
    monkeypatch.setattr(server, "make_control", lambda c: proxy)
    daemon = server.Daemon(config)
    run = asyncio.get_running_loop().create_task(daemon.run(), name="daemon")
    for _ in range(400):
        if config.socket_path.exists() or run.done():
            break
        await asyncio.sleep(0.05)
    assert not run.done() and config.socket_path.exists(), "the daemon did not start"
    return daemon, run


async def _stopped(daemon: server.Daemon, run: asyncio.Task[None]) -> bool:
    """Whether run() ended within STOP_WITHIN of `stopping` (what SIGTERM and `down` set)."""
    daemon.stopping.set()
    done, _ = await asyncio.wait({run}, timeout=STOP_WITHIN)
    if not done:   # leave nothing behind for the next test
        await cancel.stop([run], 20)
        return False
    run.result()
    return not daemon.config.socket_path.exists()   # close() ran to its end


def test_a_cancel_the_watchdog_drops_does_not_keep_the_daemon_from_stopping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> bool:
        proxy = Proxy()
        daemon, run = await _daemon(tmp_path, proxy, monkeypatch)
        proxy.drop = True
        proxy.hang.add("ping")
        await asyncio.wait_for(proxy.entered("ping").wait(), 10)   # the watchdog waits for an answer
        return await _stopped(daemon, run)

    assert uvloop.run(go()), "the daemon did not stop after SIGTERM"


def test_a_proxy_call_that_never_answers_does_not_delay_the_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> bool:
        proxy = Proxy()
        daemon, run = await _daemon(tmp_path, proxy, monkeypatch)
        proxy.hang.add("set_slot")

        async def sync() -> None:   # an instance restarted: its slot's upstreams go to the proxy
            await proxy.set_slot("blue", [("127.0.0.1", 1)])

        monkeypatch.setattr(daemon.slots, "sync", sync)
        await asyncio.wait_for(proxy.entered("set_slot").wait(), 10)
        return await _stopped(daemon, run)

    assert uvloop.run(go()), "the daemon did not stop while a proxy call hung"


def test_sigterm_inside_a_step_whose_call_drops_the_cancel_stops_the_deploy_where_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM mid-deploy undoes nothing and goes no further: the next daemon settles the
    deployment (docs/architecture.md). Before, the deployment ran on to its switch."""
    app = tmp_path / "releases" / "v1"
    app.mkdir(parents=True)
    shutil.copy(EXAMPLE, app / "server.py")

    async def silent(event: dict[str, Any]) -> None:
        return None

    async def go() -> tuple[bool, list[str | None], list[int]]:
        proxy = Proxy()
        daemon, run = await _daemon(tmp_path, proxy, monkeypatch)
        proxy.drop = True
        proxy.hang.add("set_version")   # inside `start`, once its instances are ready
        deploy = asyncio.get_running_loop().create_task(
            daemon.h_deploy({"version": "v1", "path": str(app), "wait": True}, silent))
        await asyncio.wait_for(proxy.entered("set_version").wait(), 60)
        pids = [r.pid for slot in ("blue", "green") for r in daemon.slots.supervisor.records(slot)]
        stopped = await _stopped(daemon, run)
        await cancel.stop([deploy], 5)
        return stopped, proxy.switches, pids

    stopped, switches, pids = uvloop.run(go())
    for pid in pids:   # SIGTERM leaves the app running (for the next daemon): not after a test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        # the instances are this process's children here (the daemon ran in process): reaped, or
        # the supervisor tests' zombie checks would find them later in the suite
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    assert stopped, "the daemon did not stop after SIGTERM during a step"
    assert switches == [], "the deployment went on after SIGTERM"


def test_stop_cancels_again_a_task_that_dropped_its_cancel_and_names_one_that_never_ends() -> None:
    async def go() -> tuple[bool, list[str]]:
        async def drops_twice() -> None:
            for _ in range(2):
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    pass
            await asyncio.sleep(60)

        async def never() -> None:
            while True:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    pass

        loop = asyncio.get_running_loop()
        a, b = loop.create_task(drops_twice(), name="drops"), loop.create_task(never(), name="never")
        await asyncio.sleep(0)
        left = await cancel.stop([a, b], 1.0)
        ended = a.cancelled()
        b.get_coro().close()   # type: ignore[union-attr]  # nothing else could end it
        return ended, [t.get_name() for t in left]

    ended, left = uvloop.run(go())
    assert ended and left == ["never"]


def test_leftovers_stops_every_other_task_of_the_loop() -> None:
    """What serve() runs after the daemon stopped, before the event loop's own single cancel."""
    async def go() -> tuple[list[str], bool]:
        async def drops_once() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(60)

        loop = asyncio.get_running_loop()
        plain = loop.create_task(asyncio.sleep(60), name="plain")
        dropper = loop.create_task(drops_once(), name="dropper")
        await asyncio.sleep(0)
        left = await cancel.leftovers(2.0)
        return [t.get_name() for t in left], plain.cancelled() and dropper.cancelled()

    left, ended = uvloop.run(go())
    assert left == [] and ended


class _Writer:
    """The client's end of a control connection, with the daemon's answer fed by the test."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.sent.set()

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


@pytest.mark.parametrize("hops", range(8))
def test_a_cancel_landing_as_the_answer_arrives_is_not_dropped(monkeypatch: pytest.MonkeyPatch, hops: int) -> None:
    """The answer is read; `hops` turns of the event loop later the caller is cancelled. Either the
    call had returned already, or it raises CancelledError: it never returns having been cancelled."""
    async def go() -> tuple[bool, bool]:
        reader = asyncio.StreamReader()
        writer = _Writer()

        async def connect(path: str, limit: int) -> tuple[asyncio.StreamReader, _Writer]:
            return reader, writer

        monkeypatch.setattr(rpc.asyncio, "open_unix_connection", connect)
        call = asyncio.get_running_loop().create_task(rpc.call(Path("/nonexistent"), "ping", timeout=2))
        await asyncio.wait_for(writer.sent.wait(), 5)
        reader.feed_data(b'{"ok": true, "result": {"pid": 1}}\n')
        for _ in range(hops):
            await asyncio.sleep(0)
        pending = call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            return pending, True
        return pending, False

    pending, raised = uvloop.run(go())
    assert raised or not pending, f"the cancel was dropped {hops} loop turns after the answer"
