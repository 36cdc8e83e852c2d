"""`acme = true` with a real daemon and pebble: the first certificate is issued on first start and
served by the running proxy, also when the daemon is killed (SIGKILL, SIGTERM) while the order is
under way: the next daemon orders again, the 0600 file is replaced whole, the proxy picks it up."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.daemon.harness import Project, free_port

from .certs import TestCA
from .pebble import pebble


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path, workers=2)    # every proxy worker must serve the certificate
    try:
        yield p
    finally:
        p.teardown()


def _served_serial(port: int) -> tuple[int, str]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="shop.test") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
    return cert.serial_number, cert.issuer.rfc4514_string()


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_acme_on_first_start(project: Project, tmp_path: Path, kill: signal.Signals) -> None:
    ca, tls_port = TestCA(tmp_path), free_port()
    with pebble(ca, tmp_path, project.port) as server:
        project.write('[notify]\nbackoff = "100ms"\n')
        with project.config.open("a") as f:
            f.write(f'\n[proxy.tls]\nlisten = "127.0.0.1:{tls_port}"\nacme = true\nhosts = ["shop.test"]\n'
                    f'acme_directory = "{server.directory_url}"\nacme_ca_bundle = "{ca.path}"\n'
                    'acme_email = "ops@shop.test"\n')
        cert = project.root / ".changeover" / "certs" / "shop.test.pem"
        project.start_daemon()
        # the daemon dies while the order is under way: the next one gets a certificate, and the
        # proxy, which kept running, serves it
        project.kill_daemon(kill)
        project.start_daemon()
        deadline = time.monotonic() + 30
        while not cert.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cert.exists(), (project.root / "serve.out").read_text()[-3000:]
        assert cert.stat().st_mode & 0o777 == 0o600
        issued = x509.load_pem_x509_certificate(cert.read_bytes()[cert.read_bytes().index(b"-----BEGIN CERT"):])
        # every proxy worker process ([proxy] workers) swaps it in: ten handshakes in a row see it
        streak = 0
        while time.monotonic() < deadline and streak < 10:
            streak = streak + 1 if _served_serial(tls_port)[0] == issued.serial_number else 0
            time.sleep(0.02)
        serial, issuer = _served_serial(tls_port)
        assert serial == issued.serial_number and "Pebble" in issuer
        st = project.status()
        assert st["proxy"]["tls"]["acme"]["shop.test"]["expires"]
        assert f"https: 127.0.0.1:{tls_port}; ACME: shop.test until 20" in project.cli("status").stdout

