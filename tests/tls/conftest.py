"""A real embedded proxy with its HTTPS listener on port 0, certificates from a test CA."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.tls_settings import TlsSettings
from tests.proxy.conftest import Backend, Client, LoopThread, Recorder, backends, lt, read_response

from .certs import Leaf, TestCA

__all__ = ["backends", "lt"]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@dataclass
class Site:
    ca: TestCA
    default: Leaf
    shop: Leaf
    wild: Leaf


@pytest.fixture
def site(ca: TestCA) -> Site:
    return Site(ca, ca.leaf("default", ["default.test", "127.0.0.1"]), ca.leaf("shop", ["shop.test"]),
                ca.leaf("wild", ["*.apps.test"]))


def tls_settings(site: Site, **kw: Any) -> TlsSettings:
    pairs = tuple((str(leaf.cert), str(leaf.key)) for leaf in (site.default, site.shop, site.wild))
    return TlsSettings(listen="127.0.0.1:0", certificates=pairs, **kw)


def start_tls_proxy(lt: LoopThread, backends: tuple[Backend, Backend], tls: TlsSettings,
                    reuse_port: bool = False, listen: str = "127.0.0.1:0", initial: str = "blue",
                    **kw: Any) -> EmbeddedProxy:
    proxy = EmbeddedProxy(ProxySettings(listen=listen, tls=tls, **kw), Recorder(), reuse_port=reuse_port)
    blue, green = backends
    # routes first, as the worker preloads them: a successor takes connections as soon as it listens
    lt.call(proxy.set_slot, "blue", [blue.addr])
    lt.call(proxy.set_slot, "green", [green.addr])
    lt.call(proxy.switch, initial)
    lt.run(proxy.start())
    return proxy


@pytest.fixture
def tproxy(lt: LoopThread, backends: tuple[Backend, Backend], site: Site) -> Iterator[EmbeddedProxy]:
    p = start_tls_proxy(lt, backends, tls_settings(site, hsts_max_age=600))
    yield p
    lt.run(p.close())


def tls_port(proxy: EmbeddedProxy) -> int:
    assert proxy.tls is not None
    return proxy.tls.port


def client_context(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    return ctx


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    serial: int
    version: str
    names: list[str]


def https_get(port: int, ca: TestCA, name: str | None, path: str = "/", host: str | None = None,
              extra: str = "", ctx: ssl.SSLContext | None = None) -> Answer:
    ctx = ctx or client_context(ca)
    if name is None:
        ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=name) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        c = Client(s)  # type: ignore[arg-type]
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or name or 'default.test'}\r\n{extra}\r\n".encode())
        status, headers, body = read_response(c)
        return Answer(status, headers, body, cert.serial_number, str(s.version()),
                      [str(n.value) for n in names])


def http_get(port: int, path: str = "/", host: str = "shop.test", extra: str = "") -> tuple[int, dict[str, str], bytes]:
    """Plain HTTP with the Host given."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        c = Client(s)
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return read_response(c)
