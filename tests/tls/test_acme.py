"""Automatic certificates against a real ACME server (pebble): issued on first start, renewed at
2/3 of their lifetime, and a CA that refuses leaves the last certificate serving and alerts."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from changeover.certs import manager as manager_mod
from changeover.certs.manager import CertManager
from changeover.proxy import tls
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.tls_settings import AcmeSettings, TlsSettings
from tests.proxy.conftest import Backend, LoopThread

from .certs import TestCA
from .conftest import http_get, start_tls_proxy
from .pebble import Pebble, free_port, pebble

HOST = "shop.test"


class Alerts:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def notify(self, event: str, payload: dict[str, Any]) -> None:
        self.sent.append((event, payload))

    def record(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "WATCH_INTERVAL", 0.05)


def settings(state: Path, directory: str, ca: TestCA, **kw: Any) -> tuple[TlsSettings, AcmeSettings]:
    acme = AcmeSettings(directory=directory, email="ops@shop.test", hosts=(HOST,), ca_bundle=str(ca.path),
                        certs_dir=str(state / "certs"), challenge_dir=str(state / "acme-challenges"), **kw)
    managed = (acme.cert_path(HOST),)
    return TlsSettings(listen="127.0.0.1:0", certificates=((managed[0], ""),), managed=managed,
                       https_redirect=True, challenge_dir=acme.challenge_dir), acme


@pytest.fixture
def edge(lt: LoopThread, backends: tuple[Backend, Backend], tmp_path: Path,
         ca: TestCA) -> Iterator[tuple[EmbeddedProxy, Pebble, TlsSettings, AcmeSettings]]:
    http_port = free_port()
    with pebble(ca, tmp_path, http_port) as p:
        t, a = settings(tmp_path / ".changeover", p.directory_url, ca)
        proxy = start_tls_proxy(lt, backends, t, listen=f"127.0.0.1:{http_port}")
        try:
            yield proxy, p, t, a
        finally:
            lt.run(proxy.close())


def served(proxy: EmbeddedProxy, roots: bytes | None = None) -> tuple[int, str]:
    """(serial, issuer CN) of what the HTTPS listener presents for HOST; verified when `roots`."""
    assert proxy.tls is not None
    ctx = ssl.create_default_context()
    if roots is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=roots.decode())
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", proxy.tls.port), timeout=5),
                         server_hostname=HOST) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    return cert.serial_number, cert.issuer.rfc4514_string()


def wait_served(proxy: EmbeddedProxy, serial: int, roots: bytes) -> None:
    for _ in range(400):
        try:
            if served(proxy, roots)[0] == serial:
                return
        except ssl.SSLError:
            pass
        threading.Event().wait(0.02)
    raise AssertionError(f"the proxy never served certificate {serial}")


def test_issue_renew_and_refusal(edge: tuple[EmbeddedProxy, Pebble, TlsSettings, AcmeSettings]) -> None:
    proxy, ca_server, t, a = edge
    alerts = Alerts()
    # before the first certificate: a temporary self-signed one, and ACME tokens on HTTP
    _, issuer = served(proxy)
    assert issuer == f"CN={HOST}"
    # first start: issued
    m = CertManager(t, a, alerts.notify, alerts.record)
    assert asyncio.run(m.ensure(HOST))
    path = Path(a.cert_path(HOST))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    roots = ca_server.roots()
    first = x509.load_pem_x509_certificate(path.read_bytes()[path.read_bytes().index(b"-----BEGIN CERT"):])
    wait_served(proxy, first.serial_number, roots)   # verified against pebble's root, for HOST
    assert alerts.sent[-1][0] == "certificate_issued" and alerts.sent[-1][1]["renewal"] is False
    # not due: nothing happens
    assert asyncio.run(m.ensure(HOST)) and len(alerts.sent) == 1
    # two thirds of the lifetime later: renewed
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    later = CertManager(t, a, alerts.notify, alerts.record,
                        clock=lambda: first.not_valid_before_utc + lifetime * 0.67)
    assert asyncio.run(later.ensure(HOST))
    second = x509.load_pem_x509_certificate(path.read_bytes()[path.read_bytes().index(b"-----BEGIN CERT"):])
    assert second.serial_number != first.serial_number
    wait_served(proxy, second.serial_number, roots)
    assert alerts.sent[-1][1]["renewal"] is True
    # the CA is gone: the last certificate keeps serving, an alert goes out, a retry is scheduled
    ca_server.stop()
    assert not asyncio.run(later.ensure(HOST))
    assert alerts.sent[-1][0] == "certificate_failed"
    assert "previous certificate" in alerts.sent[-1][1]["serving"]
    assert alerts.events[-1][0] == "certificate.failed"
    assert served(proxy, roots)[0] == second.serial_number
    assert later.failures[HOST] == 1
    assert not asyncio.run(later.ensure(HOST))
    assert later.failures[HOST] == 2            # backoff doubles
    assert http_get(proxy.port, "/")[0] == 301  # the redirect still works, the challenge route too
    assert http_get(proxy.port, "/.well-known/acme-challenge/x")[0] == 404


class _Refusing(BaseHTTPRequestHandler):
    """An ACME directory whose every answer is a rate-limit problem with Retry-After."""

    def do_GET(self) -> None:
        self._problem()

    def do_HEAD(self) -> None:
        self._problem()

    def do_POST(self) -> None:
        self._problem()

    def _problem(self) -> None:
        if self.path == "/dir":
            body = (b'{"newNonce": "http://%s/nonce", "newAccount": "http://%s/acct", "newOrder": "http://%s/order"}'
                    % ((self.headers["Host"].encode(),) * 3))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        elif self.path == "/nonce":
            self.send_response(200)
            self.send_header("Replay-Nonce", "bm9uY2U")
            body = b""
        else:
            body = b'{"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many certificates"}'
            self.send_response(429)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Retry-After", "7200")
            self.send_header("Replay-Nonce", "bm9uY2U")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_rate_limit_is_respected(tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t, a = settings(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/dir", ca)
        alerts = Alerts()
        now = datetime.datetime.now(datetime.UTC)
        m = CertManager(t, a, alerts.notify, alerts.record, clock=lambda: now)
        assert not asyncio.run(m.ensure(HOST))
        assert "rateLimited" in alerts.sent[-1][1]["reason"]
        assert "self-signed" in alerts.sent[-1][1]["serving"]
        # the CA said 2 hours: not sooner, though our own backoff would have been a minute
        assert m.next_try[HOST] == now + datetime.timedelta(seconds=7200)
        assert manager_mod.RETRY_BASE < 7200
        assert not Path(a.cert_path(HOST)).exists()
    finally:
        server.shutdown()
