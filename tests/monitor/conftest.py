from __future__ import annotations

import pytest

from tests.monitor.sim import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
