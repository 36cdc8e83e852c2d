"""HTTPS on a shared front: every attached project's [proxy.tls] certificates on one listener.

The listener (proxy/tls.py's TlsEdge, the same as a project's own proxy has) is started with the
[proxy.tls] of the first attached project that has one; every project's certificates are added to
its store, chosen by SNI and reloaded when their files change. On the HTTP listener each
project's ACME HTTP-01 tokens are answered from the directory its own daemon writes them to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from changeover.errors import ConfigError
from changeover.proxy.http1 import error_response
from changeover.proxy.tls import CHALLENGE_PREFIX, TlsEdge, _Cert
from changeover.proxy.tls_settings import TlsSettings

if TYPE_CHECKING:
    from changeover.proxy.front_registry import FrontProxy

log = logging.getLogger("changeover.proxy.front")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")   # an ACME token: never a path


class FrontTls:
    def __init__(self, proxy: FrontProxy) -> None:
        self.proxy = proxy

    async def apply(self) -> None:
        """Every attached project's certificates on one HTTPS listener, chosen by SNI (proxy/tls.py).
        The listener is started with the [proxy.tls] of the first project that has one; a project
        with another TLS address is refused. Files keep being watched and reloaded as usual."""
        proxy = self.proxy
        with_tls = [m for m in proxy.members.values() if m.tls]
        if proxy.tls is None:
            if not with_tls:
                return
            settings = dataclasses.replace(TlsSettings.from_wire(with_tls[0].tls or {}), challenge_dir="")
            edge = TlsEdge(proxy, settings)
            await edge.start(proxy.loop, proxy.reuse_port)
            proxy.tls = edge
            proxy.edge = self.plain_request
            log.info("HTTPS on %s for the shared front", settings.listen)
        tls = proxy.tls
        for m in with_tls:
            if (m.tls or {}).get("listen") != tls.settings.listen:
                raise ConfigError(f"the shared front serves HTTPS on {tls.settings.listen}, not on "
                                  f"{(m.tls or {}).get('listen')}: use that address", file=m.config,
                                  key="proxy.tls.listen")
        wanted = {(str(c), str(k)): str(c) in set((m.tls or {}).get("managed") or ())
                  for m in with_tls for c, k in (m.tls or {}).get("certificates") or ()}
        store = tls.store
        have = {(c.cert, c.key) for c in store.certs}
        # CertStore's own loading and placeholder steps, one certificate at a time
        for (cert, key), managed in wanted.items():
            if (cert, key) in have:
                continue
            c = _Cert(cert, key, managed)
            if not store._load(c):
                if not managed:
                    raise ConfigError(f"{cert}: {store.errors.get(cert, 'cannot be read')}", key="proxy.tls.cert")
                store._placeholder(c)
            store.certs.append(c)
        if wanted:
            store.certs = [c for c in store.certs if (c.cert, c.key) in wanted]
        store._index()

    def plain_request(self, conn: Any, method: bytes, head: bytes, target: int) -> bytes | None:
        """The HTTP listener's HTTPS duties for every project: its ACME tokens (each project's
        daemon writes them to its own directory), then the redirect of proxy/tls.py."""
        tls = self.proxy.tls
        if tls is None:
            return None
        if head.startswith(CHALLENGE_PREFIX, target):
            end = head.find(b" ", target)
            token = head[target + len(CHALLENGE_PREFIX):end].partition(b"?")[0].decode("latin-1")
            for m in self.proxy.members.values():
                d = (m.tls or {}).get("challenge_dir")
                if d and _TOKEN.fullmatch(token):
                    with contextlib.suppress(OSError):
                        body = (Path(d) / token).read_bytes()
                        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            return error_response(404, False)
        return tls.plain_request(conn, method, head, target)
