"""Let's Encrypt's test CA (Debian's `pebble`) with `pebble-challtestsrv` as its DNS: every name
resolves to 127.0.0.1, and pebble validates HTTP-01 against the proxy's HTTP port for real."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .certs import TestCA


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_pebble() -> None:
    if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
        pytest.skip("pebble is not installed (scripts/ensure-services.sh installs Debian's pebble)")


class Pebble:
    def __init__(self, ca: TestCA, directory: Path, http_port: int) -> None:
        self.ca, self.dir, self.http_port = ca, directory, http_port
        self.port, self.mgmt, self.dns = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        leaf = self.ca.leaf("pebble", ["127.0.0.1", "localhost"])
        cfg = self.dir / "pebble.json"
        cfg.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.mgmt}",
            "certificate": str(leaf.cert), "privateKey": str(leaf.key), "httpPort": self.http_port,
            "tlsPort": free_port(), "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        log = open(self.dir / "pebble.log", "ab")  # noqa: SIM115 - the children write to it
        self.procs.append(subprocess.Popen(
            ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{self.dns}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}", "-defaultIPv4", "127.0.0.1",
             "-defaultIPv6", ""], stdout=log, stderr=log))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.procs.append(subprocess.Popen(["pebble", "-config", str(cfg), "-dnsserver", f"127.0.0.1:{self.dns}"],
                                           stdout=log, stderr=log, env=env))
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                self.get(self.directory_url)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return bytes(r.read())

    def roots(self) -> bytes:
        """The root pebble signs with this run (it makes a new one every start)."""
        return self.get(f"https://127.0.0.1:{self.mgmt}/roots/0")

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)
        self.procs.clear()


@contextlib.contextmanager
def pebble(ca: TestCA, directory: Path, http_port: int) -> Iterator[Pebble]:
    need_pebble()
    p = Pebble(ca, directory, http_port).start()
    try:
        yield p
    finally:
        p.stop()
