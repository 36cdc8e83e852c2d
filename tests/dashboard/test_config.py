"""[dashboard] settings, and the dashboard server run in the daemon's own uvloop loop."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from changeover import config as config_mod
from changeover.daemon.procs import free_port
from changeover.dashboard import auth, service
from changeover.errors import ConfigError

APP = f'[app]\ncommand = [{sys.executable!r}, "server.py", "$PORT"]\n'


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """uvloop.run in a thread of its own: Playwright's session keeps a loop running in this one."""
    failure: list[BaseException] = []

    def go() -> None:
        try:
            uvloop.run(main())
        except BaseException as e:
            failure.append(e)

    t = threading.Thread(target=go)
    t.start()
    t.join(60)
    if failure:
        raise failure[0]


def load(tmp_path: Path, dashboard: str) -> config_mod.Config:
    f = tmp_path / "changeover.toml"
    f.write_text(APP + "[dashboard]\n" + dashboard)
    return config_mod.load(f)


def test_defaults_and_disabling(tmp_path: Path) -> None:
    d = load(tmp_path, "").dashboard
    assert (d.listen, d.enabled, d.tls, d.url()) == ("127.0.0.1:9180", True, False, "http://127.0.0.1:9180")
    assert not load(tmp_path, 'listen = ""').dashboard.enabled
    assert load(tmp_path, 'listen = "[::1]:9180"').dashboard.url() == "http://[::1]:9180"
    assert load(tmp_path, 'listen = "localhost:9180"').dashboard.enabled


@pytest.mark.parametrize("body, key, words", [
    ('listen = "0.0.0.0:9180"', "dashboard.listen", "loopback"),
    ('listen = "10.1.2.3:9180"', "dashboard.listen", "tls_cert and tls_key"),
    ('listen = "dash.example.com:9180"', "dashboard.listen", "loopback"),
    ('listen = "127.0.0.1"', "dashboard.listen", "HOST:PORT"),
    ('listen = "127.0.0.1:70000"', "dashboard.listen", "HOST:PORT"),
    ('tls_cert = "cert.pem"', "dashboard.tls_key", "both"),
    ('tls_cert = "missing.pem"\ntls_key = "missing.key"', "dashboard.tls_cert", "readable PEM"),
    ('allow_insecure = "yes"', "dashboard.allow_insecure", "true or false"),
    ('listn = "127.0.0.1:1"', "dashboard.listn", "unknown key"),
])
def test_bad_settings_name_file_and_key(tmp_path: Path, body: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, body)
    assert e.value.key == key and words in str(e.value) and str(tmp_path) in str(e.value)


def test_beyond_loopback_only_with_tls_or_said_in_so_many_words(tmp_path: Path) -> None:
    assert load(tmp_path, 'listen = "0.0.0.0:9180"\nallow_insecure = true').dashboard.url() == "http://127.0.0.1:9180"
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    d = load(tmp_path, 'listen = "0.0.0.0:9180"\ntls_cert = "c.pem"\ntls_key = "k.pem"').dashboard
    assert d.tls and d.tls_cert == str(tmp_path / "c.pem") and d.url().startswith("https://")


def _cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is missing")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_served_over_tls_in_the_daemons_uvloop_loop_with_no_daemon_said_plainly(tmp_path: Path) -> None:
    cert, key = _cert(tmp_path)
    port = free_port()
    cfg = load(tmp_path, f'listen = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"')
    tls = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        d = await service.start(cfg)
        assert d is not None and d._task is not None
        try:
            assert d._task.get_loop() is loop      # one loop: the daemon's
            assert (tmp_path / ".changeover" / auth.URL_FILE).read_text().strip() == f"https://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=tls) as c:
                assert (await c.get("/login")).status_code == 200
                r = await c.post("/login", data={"token": auth.read_token(tmp_path / ".changeover") or ""})
                assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
                page = await c.get("/")
                # No daemon behind it: the page says so in plain words instead of failing.
                assert page.status_code == 200 and "The daemon does not answer" in page.text
        finally:
            await d.close()
        assert not (tmp_path / ".changeover" / auth.URL_FILE).exists()

    run(main)


def test_a_taken_port_leaves_the_daemon_without_a_dashboard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    cfg = load(tmp_path, f'listen = "127.0.0.1:{port}"')

    async def main() -> None:
        assert await service.start(cfg) is None

    try:
        run(main)
    finally:
        taken.close()
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
