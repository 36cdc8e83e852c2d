"""GET /metrics over a real socket, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from changeover.errors import ChangeoverError
from changeover.monitor.exposition import ChangeoverCollector, make_registry, serve_metrics
from changeover.monitor.metrics import Recorder
from changeover.monitor.routes import RouteRules
from tests.monitor.sim import FakeClock


def filled() -> tuple[Recorder, ChangeoverCollector]:
    rec = Recorder()
    rec.set_version("blue", "v1")
    rec.set_version("green", "v2")
    for i in range(100):
        rec.record("blue", 200, 0.004, False)
        rec.record("green", 500 if i % 4 == 0 else 200, 0.3, False)
    rec.record("green", 502, 0.001, True)
    col = ChangeoverCollector(rec)
    col.set_live("green")
    col.set_deploy_state("observing")
    col.count_rollback("error_rate")
    col.count_rollback("error_rate")
    col.count_rollback("latency")
    return rec, col


async def scrape(col: ChangeoverCollector, path: str = "/metrics", method: str = "GET",
                 headers: dict[str, str] | None = None) -> httpx.Response:
    server = await serve_metrics("127.0.0.1", 0, col)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as c:
            return await c.request(method, f"http://127.0.0.1:{port}{path}", headers=headers)
    finally:
        server.close()
        await server.wait_closed()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_metrics_endpoint_exposes_requests_latency_and_deploy_facts() -> None:
    _, col = filled()
    r = asyncio.run(scrape(col))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = samples(r.text)
    lab = frozenset
    assert s[("changeover_requests_total", lab({("slot", "blue"), ("version", "v1"), ("code", "2xx")}))] == 100
    assert s[("changeover_requests_total", lab({("slot", "green"), ("version", "v2"), ("code", "5xx")}))] == 26
    assert s[("changeover_request_errors_total", lab({("slot", "green"), ("version", "v2")}))] == 26
    assert s[("changeover_upstream_failures_total", lab({("slot", "green"), ("version", "v2")}))] == 1
    green = lab({("slot", "green"), ("version", "v2")})
    assert s[("changeover_request_duration_seconds_count", green)] == 101
    assert s[("changeover_request_duration_seconds_sum", green)] == pytest.approx(30.001)
    # 0.3 s lies between the 0.2048 and 0.4096 bounds: cumulative counts are exact there
    assert s[("changeover_request_duration_seconds_bucket", lab({*green, ("le", "0.2048")}))] == 1
    assert s[("changeover_request_duration_seconds_bucket", lab({*green, ("le", "0.4096")}))] == 101
    assert s[("changeover_request_duration_seconds_bucket", lab({*green, ("le", "+Inf")}))] == 101
    assert s[("changeover_live_slot", lab({("slot", "green"), ("version", "v2")}))] == 1
    assert s[("changeover_live_slot", lab({("slot", "blue"), ("version", "v1")}))] == 0
    assert s[("changeover_deploy_state", lab({("state", "observing")}))] == 1
    assert s[("changeover_deploy_state", lab({("state", "idle")}))] == 0
    assert s[("changeover_rollbacks_total", lab({("reason", "error_rate")}))] == 2
    assert s[("changeover_rollbacks_total", lab({("reason", "latency")}))] == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in s)


def test_counters_never_go_down_across_a_version_change() -> None:
    rec, col = filled()
    rec.set_version("green", "v3")       # the v2 series stays, v3 starts
    rec.record("green", 200, 0.01, False)
    s = samples(asyncio.run(scrape(col)).text)
    v2 = frozenset({("slot", "green"), ("version", "v2"), ("code", "2xx")})
    v3 = frozenset({("slot", "green"), ("version", "v3"), ("code", "2xx")})
    assert s[("changeover_requests_total", v2)] == 75 and s[("changeover_requests_total", v3)] == 1


def test_openmetrics_when_asked() -> None:
    _, col = filled()
    r = asyncio.run(scrape(col, headers={"Accept": "application/openmetrics-text; version=1.0.0"}))
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


def test_other_paths_and_methods() -> None:
    _, col = filled()
    assert asyncio.run(scrape(col, "/")).status_code == 404
    assert asyncio.run(scrape(col, method="POST")).status_code == 405
    head = asyncio.run(scrape(col, method="HEAD"))
    assert head.status_code == 200 and head.content == b""
    assert asyncio.run(scrape(col, "/metrics?name[]=x")).status_code == 200


def test_garbage_and_silent_clients_do_not_hurt_the_server() -> None:
    async def main() -> None:
        server = await serve_metrics("127.0.0.1", 0, make_registry(filled()[1], process=False))
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"NONSENSE\r\n\r\n")
        assert (await r.read()).startswith(b"HTTP/1.1 400")
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)   # connects and hangs up
        w.close()
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_address_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ChangeoverError, match=r"cannot serve /metrics on 127.0.0.1:\d+: .*metrics_listen"):
            asyncio.run(serve_metrics("127.0.0.1", port, filled()[1]))


def test_per_route_series_are_opt_in_and_bounded(clock: FakeClock) -> None:
    rec = Recorder(clock=clock, routes=RouteRules(max_routes=4))
    rec.set_version("green", "v2")
    for i in range(60):
        rec.record("green", 500 if i % 3 == 0 else 200, 0.01, False, f"GET /cart/{i} HTTP/1.1\r\n".encode())
        rec.record("green", 200, 0.01, False, f"GET /scan-{i} HTTP/1.1\r\n".encode())
    clock.advance(1.5)
    rec.record("green", 200, 0.01, False, b"GET / HTTP/1.1\r\n")   # the second above is complete
    off = asyncio.run(scrape(ChangeoverCollector(rec))).text
    assert "changeover_route_" not in off
    got = samples(asyncio.run(scrape(ChangeoverCollector(rec, routes=True))).text)
    labels = frozenset({"slot": "green", "version": "v2", "route": "GET /cart/{id}"}.items())
    assert got[("changeover_route_requests_total", labels)] == 60
    assert got[("changeover_route_errors_total", labels)] == 20
    inf = frozenset({*labels, ("le", "+Inf")})
    assert got[("changeover_route_duration_seconds_bucket", inf)] == 60   # buckets only: no _sum
    routes = {dict(k[1])["route"] for k in got if k[0] == "changeover_route_requests_total"}
    assert len(routes) == 4 and "(other)" in routes
