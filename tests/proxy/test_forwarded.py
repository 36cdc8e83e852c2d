"""[proxy] trusted_proxies: forwarding headers are believed from a trusted peer only.

Real sockets from two source addresses: 127.0.0.1 (in trusted_proxies here) and 127.0.0.2 (not).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from changeover.errors import ConfigError
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy

from .conftest import Backend, Client, LoopThread, make_proxy, read_response

TRUSTED, UNTRUSTED = "127.0.0.1", "127.0.0.2"
CLAIMS = ("X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n"
          "Forwarded: for=203.0.113.7;proto=https\r\nX-Real-IP: 203.0.113.7\r\n")


@pytest.fixture
def proxy(lt: LoopThread, backends: tuple[Backend, Backend]) -> Iterator[EmbeddedProxy]:
    p = make_proxy(lt, backends, trusted_proxies=(f"{TRUSTED}/32",))
    yield p
    lt.run(p.close())


def seen_from(source: str, port: int, backend: Backend, extra: str = CLAIMS,
              target: str = "/") -> dict[str, str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    with s:
        c = Client(s)
        c.sendall(f"GET {target} HTTP/1.1\r\nHost: app.local\r\n{extra}\r\n".encode())
        assert read_response(c)[0] == 200
    return backend.seen[-1].headers


def test_trusted_peer_keeps_scheme_and_host_and_extends_the_chain(proxy: EmbeddedProxy,
                                                                  backends: tuple[Backend, Backend]) -> None:
    seen = seen_from(TRUSTED, proxy.port, backends[0])
    assert seen["x-forwarded-proto"] == "https"                 # the TLS terminator's word holds
    assert seen["x-forwarded-host"] == "shop.example"
    assert seen["x-forwarded-for"] == f"203.0.113.7, {TRUSTED}"
    assert seen["forwarded"] == "for=203.0.113.7;proto=https"
    assert seen["x-real-ip"] == "203.0.113.7"


def test_untrusted_peer_cannot_claim_anything(proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    seen = seen_from(UNTRUSTED, proxy.port, backends[0])
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "app.local"
    assert seen["x-forwarded-for"] == UNTRUSTED
    assert "forwarded" not in seen and "x-real-ip" not in seen


def test_trusted_peer_without_claims_gets_ours(proxy: EmbeddedProxy, backends: tuple[Backend, Backend]) -> None:
    for source in (TRUSTED, UNTRUSTED):
        seen = seen_from(source, proxy.port, backends[0], extra="")
        assert (seen["x-forwarded-for"], seen["x-forwarded-proto"], seen["x-forwarded-host"]) == (
            source, "http", "app.local")


def test_underscore_spellings_are_dropped_even_from_a_trusted_peer(proxy: EmbeddedProxy,
                                                                   backends: tuple[Backend, Backend]) -> None:
    seen = seen_from(TRUSTED, proxy.port, backends[0], extra="X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n")
    assert "x_forwarded_for" not in seen and "x_real_ip" not in seen
    assert seen["x-forwarded-for"] == TRUSTED


def test_absolute_form_goes_to_the_app_in_origin_form(proxy: EmbeddedProxy,
                                                      backends: tuple[Backend, Backend]) -> None:
    seen = seen_from(UNTRUSTED, proxy.port, backends[0], extra="", target="http://shop.example:8080/cart?x=1")
    assert backends[0].seen[-1].path == "/cart"
    assert seen["host"] == "shop.example:8080"                  # RFC 9112 §3.2.2: the URI's host wins
    assert seen["x-forwarded-host"] == "shop.example:8080"


def test_bad_trusted_proxies_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        EmbeddedProxy(ProxySettings(trusted_proxies=("10.0.0.0/33",)))
    assert info.value.key == "proxy.trusted_proxies"
