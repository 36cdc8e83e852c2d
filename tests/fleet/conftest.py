"""One real three-member etcd and one fleet of three real daemons for the whole package (starting
and stopping them is most of a fleet test's cost). Each test gets the fleet idle, in sync and
with the default config (`fleet` fixture), and deploys versions of names of its own.

Order matters once: test_fleet.py (first in the package) starts with the operator's test, whose
deploy is the fleet's first release. The tests that kill etcd members or a host's daemon put
them back before they end. test_partitions.py brings its own etcd and hosts in network
namespaces."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.fleet.cluster import ETCD, Cluster
from tests.fleet.harness import Fleet


@pytest.fixture(scope="package")
def etcd() -> Iterator[Cluster]:
    if ETCD is None:
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server; `make services` does it)")
    c = Cluster.make(3)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="package")
def shared_fleet(tmp_path_factory: pytest.TempPathFactory, etcd: Cluster) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), etcd.endpoints, prefix=f"t{uuid.uuid4().hex[:8]}")
    f.configure()
    try:
        f.start()
        yield f
    finally:
        f.teardown()


@pytest.fixture
def fleet(shared_fleet: Fleet) -> Fleet:
    """The package's fleet: idle, in sync (or with nothing live yet), default config."""
    shared_fleet.configure()
    Fleet.wait(lambda: all((h["in_sync"] or h.get("live") is None) and h.get("deployment") is None
                           for h in shared_fleet.status()["hosts"].values()), "the fleet idle and in sync")
    return shared_fleet
