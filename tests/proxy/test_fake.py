from __future__ import annotations

import asyncio

import pytest

from changeover.errors import ChangeoverError
from changeover.proxy.base import DataPlane
from changeover.proxy.fake import FakeDataPlane


def test_fake_records_and_drains() -> None:
    async def run() -> None:
        fake = FakeDataPlane()
        dp: DataPlane = fake
        await dp.start()
        dp.set_slot("blue", [("127.0.0.1", 1)])
        dp.set_slot("green", [("127.0.0.1", 2)])
        dp.switch("blue")
        dp.switch("green")
        assert dp.live == "green" and fake.switches == ["blue", "green"]
        with pytest.raises(ChangeoverError):
            dp.switch("red")
        with pytest.raises(ChangeoverError):
            dp.remove_slot("green")
        fake.begin("blue")
        assert dp.inflight("blue") == 1
        assert await dp.drain("blue", 0.05) is False
        assert dp.inflight("blue") == 0
        assert await dp.drain("blue", 0.05) is True
        assert fake.drains == [("blue", 0.05, False), ("blue", 0.05, True)]
        await dp.close()
    asyncio.run(run())
