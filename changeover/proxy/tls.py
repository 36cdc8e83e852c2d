"""TLS termination for the embedded proxy: the HTTPS listener, certificates by SNI, hot reload.

One listening socket (SO_REUSEPORT like the HTTP one, so a successor worker takes it over the same
way) is created with a *base* context whose SNI callback hands each handshake the context of the
certificate for the name asked for: an exact name, else a `*.parent` wildcard, else the first
certificate. The base context never changes, so its session-ticket keys survive certificate
reloads (resumption keeps working); the per-certificate contexts are rebuilt when their files
change (mtime, size or inode, looked at every `WATCH_INTERVAL`) and swapped in one assignment:
handshakes from then on get the new certificate, connections already open keep theirs. A file
that does not load (half written, key not matching) keeps the last good context and is logged;
the daemon's certificate watcher (changeover/certs) alerts through [notify].

Defaults: TLS 1.2 minimum (1.3 with `min_version = "1.3"`), TLS 1.2 suites ECDHE with AEAD only,
no compression or renegotiation, ALPN http/1.1.

The HTTP listener's side (`plain_request`): ACME HTTP-01 tokens from the directory the daemon
writes them to, then `https_redirect` (301 for GET/HEAD, 308 otherwise, same host and target).
The health check is answered before either, so a load balancer can keep checking over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import ssl
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from changeover.errors import ConfigError
from changeover.proxy.client import ClientConn
from changeover.proxy.http1 import HOST, error_response
from changeover.proxy.tls_settings import TlsSettings

if TYPE_CHECKING:
    from changeover.proxy.embedded import EmbeddedProxy

log = logging.getLogger("changeover.proxy.tls")
WATCH_INTERVAL = 1.0
# TLS 1.2: forward secrecy and AEAD only (TLS 1.3 suites are all AEAD and not set by this string)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}\Z")


def server_context(cert: str, key: str, min_version: str = "1.2") -> ssl.SSLContext:
    """A server context with the project's defaults, loaded with one certificate chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(cert, key or None)
    return ctx


def cert_names(cert: str) -> list[str]:
    """The DNS names a PEM certificate is for (subjectAltName, else its common name)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(cert, "rb") as f:
        leaf = x509.load_pem_x509_certificate(f.read())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n).lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def self_signed(names: Sequence[str], directory: Path) -> str:
    """A temporary self-signed certificate (key included) for names whose ACME certificate does
    not exist yet: the listener can start, and the real one is swapped in when it is written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "changeover")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)
    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="placeholder-", suffix=".pem", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def _stamp(*paths: str) -> tuple[tuple[int, int, int], ...] | None:
    try:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (os.stat(p) for p in paths if p))
    except OSError:
        return None


class _Cert:
    """One configured certificate: its files, its current context and the names it serves."""

    __slots__ = ("cert", "ctx", "failed", "key", "managed", "names", "stamp")

    def __init__(self, cert: str, key: str, managed: bool) -> None:
        self.cert, self.key, self.managed = cert, key, managed
        self.ctx: ssl.SSLContext | None = None
        self.names: list[str] = []
        self.stamp: tuple[tuple[int, int, int], ...] | None = None
        self.failed: tuple[tuple[int, int, int], ...] | None = None   # the stamp that last failed to load


class CertStore:
    """The certificates of [proxy.tls] and the SNI choice among them (see the module docstring)."""

    def __init__(self, settings: TlsSettings, placeholder_dir: Path | None = None) -> None:
        self.settings = settings
        self.placeholder_dir = placeholder_dir   # made when a placeholder is first needed
        managed = set(settings.managed)
        self.certs = [_Cert(c, k, c in managed) for c, k in settings.certificates]
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wild: dict[str, ssl.SSLContext] = {}
        self.default: ssl.SSLContext | None = None
        self.errors: dict[str, str] = {}          # cert path -> why its new files were refused
        self.reloads = 0
        self._placeholders: list[str] = []
        for c in self.certs:
            if self._load(c):
                continue
            if not c.managed:
                raise ConfigError(f"{c.cert}: {self.errors.get(c.cert, 'changed while being read')}",
                                  key="proxy.tls.cert")
            self._placeholder(c)
        self._index()
        self.base = server_context(*self._first_files(), min_version=settings.min_version)
        self.base.sni_callback = self._sni

    def _first_files(self) -> tuple[str, str]:
        for c in self.certs:
            if c.stamp is not None:
                return c.cert, c.key
        return self._placeholders[0], ""

    def _load(self, c: _Cert) -> bool:
        stamp = _stamp(c.cert, c.key)
        if stamp is None:
            self.errors[c.cert] = "no such file"
            c.failed = None
            return False
        try:
            ctx = server_context(c.cert, c.key, self.settings.min_version)
            names = cert_names(c.cert)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.errors[c.cert] = f"cannot load the certificate and key: {e}"
            c.failed = stamp
            return False
        if _stamp(c.cert, c.key) != stamp:        # changed while being read: read it again next time
            return False
        c.ctx, c.names, c.stamp, c.failed = ctx, names, stamp, None
        self.errors.pop(c.cert, None)
        return True

    def _placeholder(self, c: _Cert) -> None:
        name = Path(c.cert).name.removesuffix(".pem")
        if self.placeholder_dir is None:
            self.placeholder_dir = Path(tempfile.mkdtemp(prefix="changeover-tls-"))
        path = self_signed([name], self.placeholder_dir)
        self._placeholders.append(path)
        c.ctx = server_context(path, "", self.settings.min_version)
        c.names = [name]
        log.info("no certificate yet for %s: serving a temporary self-signed one until it is issued", name)

    def _index(self) -> None:
        exact: dict[str, ssl.SSLContext] = {}
        wild: dict[str, ssl.SSLContext] = {}
        for c in self.certs:
            if c.ctx is None:
                continue
            for n in c.names:
                if n.startswith("*."):
                    wild.setdefault(n[2:], c.ctx)
                else:
                    exact.setdefault(n, c.ctx)
        self.exact, self.wild = exact, wild
        self.default = next((c.ctx for c in self.certs if c.ctx is not None), None)

    def pick(self, name: str | None) -> ssl.SSLContext | None:
        if name:
            name = name.lower().rstrip(".")
            ctx = self.exact.get(name)
            if ctx is None:
                ctx = self.wild.get(name.partition(".")[2])
            if ctx is not None:
                return ctx
        return self.default

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, base: ssl.SSLContext) -> int | None:
        ctx = self.pick(name)
        if ctx is not None and ctx is not base:
            sslobj.context = ctx
        return None

    def check(self) -> bool:
        """Reload the certificates whose files changed; True when something was swapped in."""
        changed = False
        for c in self.certs:
            stamp = _stamp(c.cert, c.key)
            if stamp is None or stamp == c.stamp or stamp == c.failed:
                continue
            if self._load(c):
                changed = True
                log.info("certificate %s reloaded (%s)", c.cert, ", ".join(c.names))
            elif c.failed is not None:
                log.error("certificate %s changed but is not usable, still serving the previous one: %s",
                          c.cert, self.errors.get(c.cert))
        if changed:
            self.reloads += 1
            self._index()
        return changed

    def close(self) -> None:
        for p in self._placeholders:
            with contextlib.suppress(OSError):
                os.unlink(p)
        if self.placeholder_dir is not None:
            with contextlib.suppress(OSError):
                self.placeholder_dir.rmdir()


class TlsClientConn(ClientConn):
    """A client connection that arrived over TLS: the app is told https, responses carry HSTS.

    Made when the TCP connection is accepted, but a client of the proxy (`connection_made`) only
    once the handshake is done: meanwhile it is in `TlsEdge.handshaking`, which a retiring proxy
    waits for too (a weak set: a handshake that fails drops the connection and its entry)."""

    __slots__ = ("__weakref__",)
    https = True

    def __init__(self, proxy: EmbeddedProxy) -> None:
        super().__init__(proxy)
        if proxy.tls is not None:
            proxy.tls.handshaking.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self.proxy.tls
        assert tls is not None
        tls.handshaking.discard(self)
        super().connection_made(transport)
        self.fwd = tls.forwarded_headers(self.ip)

    def response_head(self, head: bytes, close_delimited: bool) -> bytes:
        tls = self.proxy.tls
        if tls is not None and tls.hsts:
            head += tls.hsts
        return super().response_head(head, close_delimited)


class TlsEdge:
    """The proxy's TLS listener and the HTTP listener's HTTPS duties (see the module docstring)."""

    def __init__(self, proxy: EmbeddedProxy, settings: TlsSettings) -> None:
        self.proxy = proxy
        self.settings = settings
        self.store = CertStore(settings)
        self.server: asyncio.Server | None = None
        self.hsts = (f"Strict-Transport-Security: max-age={settings.hsts_max_age}\r\n".encode()
                     if settings.hsts_max_age else b"")
        self.challenge_dir = settings.challenge_dir
        self.port = 0
        self._fwd_cache: dict[bytes, bytes] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.handshaking: weakref.WeakSet[TlsClientConn] = weakref.WeakSet()   # accepted, handshake under way

    @property
    def ssl(self) -> ssl.SSLContext:
        return self.store.base

    async def start(self, loop: asyncio.AbstractEventLoop, reuse_port: bool) -> None:
        from changeover.proxy.embedded import ListenError

        s = self.settings
        try:
            self.server = await loop.create_server(
                lambda: TlsClientConn(self.proxy), s.host or None, s.port, backlog=2048, ssl=self.store.base,
                reuse_address=True, reuse_port=reuse_port, ssl_handshake_timeout=self.proxy.settings.header_timeout)
        except OSError as e:
            raise ListenError(e.errno or 0, e.strerror or str(e), s.listen, key="proxy.tls.listen") from None
        self.port = int(self.server.sockets[0].getsockname()[1]) if self.server.sockets else s.port
        self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self.store.check()
            except Exception:
                log.exception("checking the certificate files failed")

    def stop_listening(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()

    async def close(self) -> None:
        self.stop_listening()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self.store.close()

    def status(self) -> dict[str, object]:
        return {"port": self.port, "reloads": self.store.reloads, "errors": dict(self.store.errors),
                "certificates": [{"cert": c.cert, "names": c.names, "placeholder": c.stamp is None}
                                 for c in self.store.certs]}

    def forwarded_headers(self, ip: bytes) -> bytes:
        fwd = self._fwd_cache.get(ip)
        if fwd is None:
            fwd = b"X-Forwarded-For: " + ip + b"\r\nX-Forwarded-Proto: https\r\nVia: 1.1 changeover\r\n"
            if len(self._fwd_cache) < 4096:
                self._fwd_cache[ip] = fwd
        return fwd

    # -- the HTTP listener -------------------------------------------------------------------------
    def plain_request(self, conn: ClientConn, method: bytes, head: bytes, target: int) -> bytes | None:
        """What the HTTP listener answers itself before routing (an ACME token, a redirect to
        https), or None to route the request as usual."""
        if self.challenge_dir and head.startswith(CHALLENGE_PREFIX, target):
            return self._challenge(head, target)
        if not self.settings.https_redirect:
            return None
        if conn.trusted and _says_https(head):
            return None                    # a TLS terminator in front already did it: no loop
        m = HOST.search(head)
        if m is None:
            return error_response(400, True)
        host = m.group(1)
        host = host[:host.find(b"]") + 1] if host.startswith(b"[") else host.partition(b":")[0]
        if self.port != 443 and self.port:
            host += b":" + str(self.port).encode()
        path = head[target:head.find(b" ", target)]
        status = b"301 Moved Permanently" if method in (b"GET", b"HEAD") else b"308 Permanent Redirect"
        location = b"https://" + host + path
        return (b"HTTP/1.1 " + status + b"\r\nLocation: " + location +
                b"\r\nContent-Length: 0\r\nCache-Control: no-store\r\nVia: 1.1 changeover\r\n\r\n")

    def _challenge(self, head: bytes, target: int) -> bytes:
        end = head.find(b" ", target)
        token = head[target + len(CHALLENGE_PREFIX):end].partition(b"?")[0]
        body = b""
        if _TOKEN.match(token):
            with contextlib.suppress(OSError):
                body = (Path(self.challenge_dir) / token.decode()).read_bytes()
        if not body:
            return error_response(404, False)
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\nContent-Length: " +
                str(len(body)).encode() + b"\r\n\r\n" + body)


_HTTPS_CLAIM = re.compile(rb"\r\nx-forwarded-proto:[ \t]*https[ \t]*\r\n", re.IGNORECASE)


def _says_https(head: bytes) -> bool:
    return _HTTPS_CLAIM.search(head) is not None
