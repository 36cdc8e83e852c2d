"""Route keys: ids collapsed, config patterns, bounded."""

from __future__ import annotations

import pytest

from changeover.monitor.routes import OTHER, Pattern, RouteRules, template


@pytest.mark.parametrize("path,want", [
    ("/", "GET /"),
    ("/users/42/orders?page=2", "GET /users/{id}/orders"),
    ("/orders/3f2b8c1e-9d4a-4b7e-8f00-1234567890ab", "GET /orders/{id}"),
    ("/blobs/deadbeefcafebabe0123", "GET /blobs/{id}"),
    ("/s/aB3dE5gH7jK9mN1pQ3sT5v", "GET /s/{id}"),
    ("/products/red-shoes", "GET /products/red-shoes"),
    ("/v2/items", "GET /v2/items"),
    ("http://shop.example.com/cart/7", "GET /cart/{id}"),
])
def test_template(path: str, want: str) -> None:
    assert template("GET", path) == want


def test_key_reads_a_request_line_or_head() -> None:
    rules = RouteRules()
    assert rules.key(b"POST /cart/12 HTTP/1.1\r\nHost: x\r\n\r\n") == "POST /cart/{id}"
    assert rules.key("GET /a?b=c") == "GET /a"


def test_patterns_group_what_collapsing_leaves_apart() -> None:
    rules = RouteRules(("GET /shop/*", "/static/**", "/api/*/health"))
    assert rules.key(b"GET /shop/red-shoes HTTP/1.1") == "GET /shop/*"
    assert rules.key(b"POST /shop/red-shoes HTTP/1.1") == "POST /shop/red-shoes"   # GET only
    assert rules.key(b"GET /static/js/app.js HTTP/1.1") == "GET /static/**"
    assert rules.key(b"HEAD /api/v1/health HTTP/1.1") == "HEAD /api/*/health"
    assert rules.rekey("GET /shop/{id}") == "GET /shop/*" and rules.rekey(OTHER) == OTHER


@pytest.mark.parametrize("bad", ["shop", "GET /a/**/b", "G3T /a"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(ValueError):
        Pattern.parse(bad)
