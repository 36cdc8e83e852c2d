"""The [dashboard] section of changeover.toml.

    [dashboard]
    listen = "127.0.0.1:9180"     # "" disables the dashboard
    tls_cert = "/etc/changeover/dash.pem"   # both, or neither
    tls_key = "/etc/changeover/dash.key"
    allow_insecure = false        # true: listen beyond loopback without TLS (a trusted network only)

The dashboard can roll back production, so it listens on loopback unless told otherwise, and
beyond loopback only over TLS, or with `allow_insecure = true` said in so many words.
This module must stay light (no web framework imports): config.load() calls it for every command.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from changeover.tables import Table

DEFAULT_LISTEN = "127.0.0.1:9180"
_LISTEN = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


@dataclass(frozen=True)
class DashboardConfig:
    listen: str = DEFAULT_LISTEN
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_insecure: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def url(self, port: int | None = None) -> str:
        """The address a browser on this host uses (a wildcard listen is reached on loopback)."""
        host, p = self.address
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{port or p}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def load(t: Table) -> DashboardConfig:
    listen = t.str("listen", DEFAULT_LISTEN)
    if listen:
        m = _LISTEN.fullmatch(listen)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise t.error("listen", "HOST:PORT, e.g. '127.0.0.1:9180', or \"\" to disable", listen)
    cert, key = t.str("tls_cert", "") or None, t.str("tls_key", "") or None
    if (cert is None) != (key is None):
        raise t.error("tls_key" if key is None else "tls_cert", "both tls_cert and tls_key, or neither")
    root = Path(t.file).parent
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if path is not None and not (root / path).is_file():
            raise t.error(name, "a readable PEM file", path)
    cert = str(root / cert) if cert else None
    key = str(root / key) if key else None
    allow = t.bool("allow_insecure", False)
    t.finish()
    cfg = DashboardConfig(listen=listen, tls_cert=cert, tls_key=key, allow_insecure=allow)
    if cfg.enabled and not is_loopback(cfg.address[0]) and not cfg.tls and not allow:
        raise t.error("listen", "a loopback address (127.0.0.1, ::1, localhost), or tls_cert and tls_key for "
                      f"{listen}: the dashboard controls deploys and would be reachable from the network in "
                      "clear text (set allow_insecure = true only on a network you trust)", listen)
    return cfg
