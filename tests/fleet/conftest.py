from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.cluster import ETCD, Cluster
from tests.fleet.harness import Fleet


@pytest.fixture(scope="module")
def etcd() -> Iterator[Cluster]:
    if ETCD is None:
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server; `make services` does it)")
    c = Cluster.make(3)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def fleet(tmp_path: Path, etcd: Cluster) -> Iterator[Fleet]:
    f = Fleet(tmp_path, etcd.endpoints, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        yield f
    finally:
        f.teardown()
