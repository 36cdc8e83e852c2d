"""`acme = true` with a real daemon and pebble: renewal, then a CA that refuses (the last
certificate keeps serving, the [notify] webhook gets certificate_failed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.daemon.harness import Project, free_port

from .certs import TestCA
from .pebble import pebble
from .test_daemon_acme import _served_serial


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path, workers=2)    # every proxy worker must serve the certificate
    try:
        yield p
    finally:
        p.teardown()


def test_renewal_then_a_refusing_ca(project: Project, tmp_path: Path) -> None:
    """pebble's certificates live five years: `acme_renew_before` longer than that makes every
    certificate due at once, so the daemon renews it (after MIN_RECHECK) and the proxy serves the
    new one. Then the CA goes away: the next renewal fails, the last certificate keeps serving and
    a `certificate_failed` notification reaches the [notify] webhook."""
    from tests.daemon.test_auto_rollback import Hooks

    ca, tls_port, hooks = TestCA(tmp_path), free_port(), Hooks()
    with pebble(ca, tmp_path, project.port) as server:
        project.write(f'[notify]\nbackoff = "100ms"\n[[notify.webhooks]]\nurl = "http://127.0.0.1:{hooks.port}/hook"\n')
        with project.config.open("a") as f:
            f.write(f'\n[proxy.tls]\nlisten = "127.0.0.1:{tls_port}"\nacme = true\nhosts = ["shop.test"]\n'
                    f'acme_directory = "{server.directory_url}"\nacme_ca_bundle = "{ca.path}"\n'
                    'acme_renew_before = "50000h"\n')
        cert = project.root / ".changeover" / "certs" / "shop.test.pem"
        project.start_daemon()

        def serial() -> int | None:
            try:
                data = cert.read_bytes()
            except FileNotFoundError:
                return None
            return x509.load_pem_x509_certificate(data[data.index(b"-----BEGIN CERT"):]).serial_number

        deadline = time.monotonic() + 60
        while serial() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first = serial()
        assert first is not None
        while serial() == first and time.monotonic() < deadline:
            time.sleep(0.1)
        second = serial()
        assert second is not None and second != first, "not renewed"
        # Each proxy worker ([proxy] workers) picks the new file up within a second of its own:
        # until then a new handshake may land on one still serving the previous certificate.
        renewed = 0
        while renewed < 5 and time.monotonic() < deadline + 30:
            renewed = renewed + 1 if _served_serial(tls_port)[0] in (second, serial()) else 0
            time.sleep(0.05)
        assert renewed == 5, "the renewed certificate is not served by every worker"
        assert "certificate_issued" in hooks.names()
        server.stop()
        while "certificate_failed" not in hooks.names() and time.monotonic() < deadline + 30:
            time.sleep(0.1)
        failed = next(e for e in hooks.events if e.get("event") == "certificate_failed")
        assert failed["host"] == "shop.test" and "previous certificate" in failed["serving"], failed
        last = serial()
        assert last is not None
        served = 0                                    # still served, by every worker
        while served < 5 and time.monotonic() < deadline + 45:
            served = served + 1 if _served_serial(tls_port)[0] == last else 0
            time.sleep(0.05)
        assert served == 5, "the last certificate is not what the proxy serves"
