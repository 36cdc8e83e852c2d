"""The fake proxy control behaves like the embedded proxy towards the daemon."""

from __future__ import annotations

import asyncio

import pytest

from changeover.errors import ChangeoverError
from changeover.monitor import mirror
from changeover.monitor.metrics import Recorder
from changeover.proxy.control import ProxyControl
from changeover.proxy.fake import FakeControl


def test_fake_records_switches_drains_and_failures() -> None:
    async def run() -> None:
        fake = FakeControl()
        pc: ProxyControl = fake
        assert await pc.ensure() == "started" and await pc.live() is None
        await pc.set_slot("blue", [("127.0.0.1", 1)])
        await pc.set_slot("green", [("127.0.0.1", 2)])
        await pc.switch("blue")
        await pc.switch("green")
        assert await pc.live() == "green" and fake.switches == ["blue", "green"]
        with pytest.raises(ChangeoverError):
            await pc.switch("red")
        with pytest.raises(ChangeoverError):
            await pc.remove_slot("green")
        fake.begin("blue")
        assert await pc.drain("blue", 0.05) is False
        assert await pc.drain("blue", 0.05) is True
        fake.fail_next("switch")
        with pytest.raises(ChangeoverError, match="switch"):
            await pc.switch("blue")
        assert await pc.live() == "green"
        fake.request("green", 500)
        fake.request("green", 200)
        rec = Recorder()
        mirror.absorb(rec, await pc.metrics(None))
        assert rec.window("green", 10).requests == 2
        info = await pc.ping()
        assert info is not None and info["live"] == "green"
        await pc.shutdown()
        assert await pc.ping() is None

    asyncio.run(run())
