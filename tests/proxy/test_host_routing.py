"""Host routing on a shared front: real sockets, real backends, the front's own ops.

Two sites on one listener; the Host header (case-insensitive, port stripped, exact or wildcard)
picks the site; each site's key opens only its own routes; a taken host name is refused naming
both config files; the registry brings every site back in a new front process.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from changeover import rpc
from changeover.errors import ChangeoverError, ConfigError
from changeover.proxy.base import ProxySettings
from changeover.proxy.embedded import EmbeddedProxy
from changeover.proxy.front import Front, serve
from changeover.proxy.routes import HostTable, Site, normalize_host, request_host
from tests.proxy.conftest import Backend, LoopThread, raw, read_response, start_backend

UID = os.getuid()


def test_host_names_normalize_and_match() -> None:
    assert normalize_host(" Shop.Example.COM. ") == "shop.example.com"
    assert normalize_host("*.example.com") == "*.example.com" and normalize_host("*") == "*"
    for bad in ("", "a..b", "-a.com", "a b", "*.*.com", "shop.*.com", "a_b.com", "x" * 64 + ".com"):
        with pytest.raises(ValueError):
            normalize_host(bad)
    assert request_host(b"SHOP.test:8080") == "shop.test"
    assert request_host(b"[::1]:80") == "::1" and request_host(b"shop.test.") == "shop.test"

    t = HostTable()
    a, b, c = (Site(n, (), None) for n in "abc")  # type: ignore[arg-type]
    t.set_hosts(a, ("shop.test", "*.shop.test"))
    t.set_hosts(b, ("*.test",))
    assert t.find("shop.test") is a and t.find("x.y.shop.test") is a
    assert t.find("blog.test") is b and t.find("test") is None    # a wildcard never matches the bare name
    t.set_hosts(c, ("*",))
    assert t.find("anything.else") is c
    t.set_hosts(a, ("shop.test",))                                  # a site's names are replaced, not added
    assert t.find("x.shop.test") is b and t.lookup(b"GET / HTTP/1.1\r\nHost: SHOP.test:81\r\n\r\n") is a


def test_a_single_project_proxy_has_no_host_table() -> None:
    assert EmbeddedProxy(ProxySettings(listen="127.0.0.1:0")).sites is None


@pytest.fixture
def apps(lt: LoopThread) -> Iterator[tuple[Backend, Backend, Backend]]:
    bs = tuple(lt.run(start_backend(n)) for n in ("shop-blue", "shop-green", "blog-blue"))
    yield bs  # type: ignore[misc]
    for b in bs:
        assert b.server is not None
        b.server.close()


class FrontUnderTest:
    """A Front in the test's loop thread, its control socket served, and two attached projects."""

    def __init__(self, lt: LoopThread, tmp: Path) -> None:
        self.lt, self.tmp = lt, tmp
        self.sock, self.registry = tmp / "front.sock", tmp / "front.sock.json"
        self.front = Front(self.sock, self.registry, ProxySettings(listen="127.0.0.1:0", drain_timeout=2))
        lt.run(self.front.proxy.start())
        self.server = lt.run(serve(self.sock, self.front.handlers()))
        self.port = self.front.proxy.port
        self.keys: dict[str, str] = {}

    def op(self, op: str, who: str | None = None, uid: int = UID, **args: Any) -> Any:
        if who is not None:
            args["key"] = self.keys[who]
        return self.lt.run(self.front.handlers()[op](args, uid))

    def attach(self, name: str, hosts: list[str], initial: dict[str, Any] | None = None, uid: int = UID) -> Any:
        state = self.tmp / name / ".changeover"
        state.mkdir(parents=True, exist_ok=True)
        self.keys.setdefault(name, secrets.token_hex(32))
        return self.op("attach", uid=uid, project=str(state), config=str(self.tmp / name / "changeover.toml"),
                       hosts=hosts, key=self.keys[name], initial=initial)

    def close(self) -> None:
        self.server.close()
        self.lt.run(self.front.proxy.close())


@pytest.fixture
def front(lt: LoopThread, tmp_path: Path, apps: tuple[Backend, Backend, Backend]) -> Iterator[FrontUnderTest]:
    f = FrontUnderTest(lt, tmp_path)
    shop_blue, shop_green, blog = apps
    f.attach("shop", ["shop.test", "*.shop.test"], {"slots": {"blue": [list(shop_blue.addr)],
                                                              "green": [list(shop_green.addr)]},
                                                    "versions": {"blue": "s1", "green": "s2"}, "live": "blue"})
    f.attach("blog", ["blog.test"])
    f.op("set_slot", "blog", slot="blue", upstreams=[list(blog.addr)])
    f.op("switch", "blog", slot="blue")
    yield f
    f.close()


def fetch(port: int, host: str, path: str = "/", target: str | None = None) -> tuple[int, bytes]:
    with raw(port) as s:
        s.sendall(f"GET {target or path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status, _, body = read_response(s)
        return status, body


def test_the_host_header_picks_the_project(front: FrontUnderTest) -> None:
    p = front.port
    assert fetch(p, "shop.test") == (200, b"shop-blue")
    assert fetch(p, "SHOP.Test:8443") == (200, b"shop-blue")
    assert fetch(p, "www.eu.shop.test") == (200, b"shop-blue")
    assert fetch(p, "blog.test") == (200, b"blog-blue")
    assert fetch(p, "nobody.test")[0] == 404
    assert fetch(p, "www.blog.test")[0] == 404            # blog claimed only its exact name
    # absolute-form: the URI's authority is the host (RFC 9112 §3.2.2), not the Host header
    assert fetch(p, "shop.test", target="http://blog.test/") == (200, b"blog-blue")
    with raw(p) as s:                                    # one keep-alive connection, two projects
        for host, want in (("shop.test", b"shop-blue"), ("blog.test", b"blog-blue"), ("shop.test", b"shop-blue")):
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert read_response(s)[2] == want


def test_a_switch_moves_only_its_own_project(front: FrontUnderTest) -> None:
    assert front.op("switch", "shop", slot="green") == {"was": "blue", "live": "green"}
    assert fetch(front.port, "shop.test") == (200, b"shop-green")
    assert fetch(front.port, "blog.test") == (200, b"blog-blue")
    with pytest.raises(ChangeoverError, match="unknown slot 'green'"):
        front.op("switch", "blog", slot="green")          # the shop's green is not the blog's to name
    with pytest.raises(ChangeoverError, match="without '@'"):
        front.op("switch", "blog", slot="green@" + front.front.proxy.table.find("shop.test").id)  # type: ignore[union-attr]
    assert fetch(front.port, "shop.test") == (200, b"shop-green")
    assert front.lt.run(front.front.drain({"key": front.keys["shop"], "slot": "blue", "timeout": 1}, UID)) is True


def test_each_project_counts_only_its_own_requests(front: FrontUnderTest) -> None:
    for _ in range(5):
        fetch(front.port, "shop.test")
    fetch(front.port, "blog.test")
    shop = front.op("metrics", "shop")
    blog = front.op("metrics", "blog")
    total = {name: sum(r[1][0] for r in s["rows"]) for name, s in shop["slots"].items()}
    assert total == {"blue": 5, "green": 0} and shop["slots"]["blue"]["version"] == "s1"
    assert {name: sum(r[1][0] for r in s["rows"]) for name, s in blog["slots"].items()} == {"blue": 1}


def test_keys_uids_and_claims_are_checked(front: FrontUnderTest, tmp_path: Path) -> None:
    with pytest.raises(ChangeoverError, match="refused: this key opens no project"):
        front.op("switch", key="x" * 64, slot=None)
    with pytest.raises(ChangeoverError, match=r"refused: the project of .* belongs to uid"):
        front.op("switch", "shop", uid=UID + 4242, slot=None)
    with pytest.raises(ChangeoverError, match=r"refused: .* belongs to uid"):
        front.attach("intruder", ["intruder.test"], uid=UID + 4242)      # not the owner of that state dir
    front.keys["shop"], real = secrets.token_hex(32), front.keys["shop"]
    with pytest.raises(ChangeoverError, match="attached with another key"):
        front.attach("shop", ["shop.test"])                              # re-attaching as the shop needs its key
    front.keys["shop"] = real
    front.attach("api", ["api.test", "www.shop.test"])   # an exact name under another's wildcard: allowed
    assert fetch(front.port, "www.shop.test")[0] == 503  # and it wins over the wildcard (nothing live yet)
    with pytest.raises(ConfigError) as e:
        front.attach("api2", ["api2.test", "shop.test"])
    msg = str(e.value)
    assert "shop.test" in msg and str(tmp_path / "shop" / "changeover.toml") in msg
    assert str(tmp_path / "api2" / "changeover.toml") in msg and e.value.key == "proxy.hosts"
    assert fetch(front.port, "shop.test") == (200, b"shop-blue")


def test_the_wire_refuses_unknown_ops_and_foreign_keys(front: FrontUnderTest) -> None:
    async def go() -> list[str]:
        out = []
        for op, args in (("switch", {"slot": "blue"}), ("set_slot", {"key": front.keys["blog"], "slot": "x@y",
                                                                     "upstreams": [["127.0.0.1", 1]]}),
                         ("eval", {})):
            try:
                await rpc.call(front.sock, op, args, timeout=5)
                out.append("ACCEPTED")
            except ChangeoverError as e:
                out.append(str(e))
        return out
    refused = asyncio.run(go())
    assert refused[0].startswith("refused") and "without '@'" in refused[1] and "no operation 'eval'" in refused[2]
    info = asyncio.run(rpc.call(front.sock, "ping", {}, timeout=5))
    assert {tuple(s["hosts"]) for s in info["sites"]} == {("shop.test", "*.shop.test"), ("blog.test",)}
    assert "key" not in json.dumps(info) and oct(os.stat(front.sock).st_mode & 0o777) == "0o660"


def test_a_new_front_routes_every_project_from_the_registry(front: FrontUnderTest, lt: LoopThread) -> None:
    front.op("switch", "shop", slot="green")
    data = json.loads(front.registry.read_text())
    assert oct(os.stat(front.registry).st_mode & 0o777) == "0o600"
    assert all(len(s["key_hash"]) == 64 for s in data["sites"].values())    # hashes only, never a key
    assert not any(k in front.registry.read_text() for k in front.keys.values())
    front.close()
    again = Front(front.sock, front.registry, ProxySettings(listen="127.0.0.1:0"))
    again.load()
    lt.run(again.proxy.start())
    try:
        assert fetch(again.proxy.port, "shop.test") == (200, b"shop-green")
        assert fetch(again.proxy.port, "blog.test") == (200, b"blog-blue")
        assert again.proxy.members[again.proxy.table.find("shop.test").id].site.recorder.version("green") == "s2"  # type: ignore[union-attr]
    finally:
        lt.run(again.proxy.close())
    front.server = lt.run(serve(front.sock, front.front.handlers()))   # for the fixture's close()
    lt.run(front.front.proxy.start())


def test_detaching_frees_the_names(front: FrontUnderTest) -> None:
    assert front.op("detach", "blog") == {"left": 1}
    assert fetch(front.port, "blog.test")[0] == 404
    assert fetch(front.port, "shop.test") == (200, b"shop-blue")
    front.attach("blog2", ["blog.test"])                 # a free name can be claimed again


def test_https_serves_each_projects_certificate_and_acme_tokens(front: FrontUnderTest, tmp_path: Path) -> None:
    """[proxy.tls] of each attached project on one HTTPS listener: SNI picks the project's own
    certificate, the Host its routes; each project's ACME tokens are answered on HTTP."""
    import socket as socketmod
    import ssl

    from changeover.proxy.tls import self_signed
    from tests.daemon.harness import free_port

    tls_port = free_port()
    certs = {name: self_signed(names, tmp_path / name / "certs")
             for name, names in (("shop", ["shop.test", "*.shop.test"]), ("blog", ["blog.test"]))}
    for name, hosts in (("shop", ["shop.test", "*.shop.test"]), ("blog", ["blog.test"])):
        challenges = tmp_path / name / "challenges"
        challenges.mkdir()
        (challenges / f"tok-{name}").write_text(f"proof-{name}")
        tls = {"listen": f"127.0.0.1:{tls_port}", "certificates": [[certs[name], ""]], "managed": [],
               "https_redirect": False, "hsts_max_age": 0, "min_version": "1.2",
               "challenge_dir": str(challenges)}
        front.lt.run(front.front.handlers()["attach"](
            {"project": str(tmp_path / name / ".changeover"), "config": str(tmp_path / name / "changeover.toml"),
             "hosts": hosts, "key": front.keys[name], "tls": tls}, UID))
    trust = ssl.create_default_context()
    for pem in certs.values():
        trust.load_verify_locations(pem)
    for host, body in (("shop.test", b"shop-blue"), ("www.shop.test", b"shop-blue"), ("blog.test", b"blog-blue")):
        with socketmod.create_connection(("127.0.0.1", tls_port), timeout=5) as s, \
                trust.wrap_socket(s, server_hostname=host) as t:        # verifies the certificate for host
            t.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := t.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(body), (host, data[:200])
    for name in ("shop", "blog"):
        token = f"/.well-known/acme-challenge/tok-{name}"
        assert fetch(front.port, "shop.test", token) == (200, f"proof-{name}".encode())
    assert fetch(front.port, "shop.test", "/.well-known/acme-challenge/..%2fkey")[0] == 404


def test_a_project_of_its_own_with_hosts_answers_only_those(lt: LoopThread,
                                                            backends: tuple[Backend, Backend]) -> None:
    """`[proxy] hosts` without `shared`: the project's own proxy serves its names, 404 for others."""
    from tests.proxy.conftest import make_proxy

    proxy = make_proxy(lt, backends, hosts=("shop.test", "*.shop.test"))
    try:
        assert fetch(proxy.port, "Shop.Test:8000") == (200, b"blue")
        assert fetch(proxy.port, "a.shop.test") == (200, b"blue")
        assert fetch(proxy.port, "elsewhere.test")[0] == 404
        lt.call(proxy.switch, "green")
        assert fetch(proxy.port, "shop.test") == (200, b"green")
    finally:
        lt.run(proxy.close())


def test_a_project_deleted_without_down_does_not_keep_its_names(front: FrontUnderTest, tmp_path: Path,
                                                                 lt: LoopThread) -> None:
    import shutil

    front.attach("old", ["gone.test"])
    shutil.rmtree(tmp_path / "old")
    front.attach("new", ["gone.test"])                  # the old claim is dropped, not an error
    assert {tuple(m.site.hosts) for m in front.front.proxy.members.values()} >= {("gone.test",)}
    shutil.rmtree(tmp_path / "new")
    again = Front(front.sock, front.registry, ProxySettings(listen="127.0.0.1:0"))
    again.load()                                          # nor after a restart of the front
    assert len(again.proxy.members) == 2 and again.proxy.table.find("gone.test") is None


def test_pause_and_maintenance_are_per_project(front: FrontUnderTest) -> None:
    """One project paused or in maintenance on the front: its requests are held or get the page,
    the other project's are served as usual."""
    import socket as socketmod

    front.op("pause", "shop", seconds=10, max_held=100)
    held = socketmod.create_connection(("127.0.0.1", front.port), timeout=5)
    try:
        held.sendall(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        assert fetch(front.port, "blog.test") == (200, b"blog-blue")       # not held
        assert front.op("mode", "shop")["held"] == 1 and front.op("mode", "blog")["paused"] is False
        assert front.op("resume", "shop") == {"released": 1}
        held.settimeout(5)
        assert held.recv(65536).endswith(b"shop-blue")
    finally:
        held.close()
    mode = front.op("maintenance", "blog", on=True, page="<h1>back soon</h1>", retry_after=7)
    assert mode["maintenance"] is True
    with raw(front.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: blog.test\r\n\r\n")
        status, headers, body = read_response(s)
    assert status == 503 and headers["retry-after"] == "7" and body == b"<h1>back soon</h1>"
    assert fetch(front.port, "shop.test") == (200, b"shop-blue")
    saved = json.loads(front.registry.read_text())["sites"]
    assert [s["mode"]["maintenance"] is not None for s in saved.values()].count(True) == 1
    front.op("maintenance", "blog", on=False)
    assert fetch(front.port, "blog.test") == (200, b"blog-blue")
