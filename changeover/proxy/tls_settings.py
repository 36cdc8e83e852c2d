"""[proxy.tls]: what the TLS listener serves, and where automatic (ACME) certificates come from.

    [proxy.tls]
    listen = "0.0.0.0:443"
    cert = "/etc/ssl/shop.pem"          # PEM: the certificate, then its chain
    key = "/etc/ssl/shop.key"
    https_redirect = true               # the HTTP listener answers 301/308 to https://
    hsts = true                         # or a max-age in seconds

    [[proxy.tls.certificates]]          # more certificates, chosen by SNI from their names
    cert = "/etc/ssl/admin.pem"
    key = "/etc/ssl/admin.key"

    acme = true                         # automatic certificates (changeover/certs)
    hosts = ["shop.example.com"]
    acme_email = "ops@example.com"

`TlsSettings` travels to the proxy worker inside `ProxySettings` (as JSON); `AcmeSettings` stays
in the daemon, which runs the ACME client and writes what it gets under `.changeover/certs/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from changeover.tables import Table, parse_duration

DEFAULT_TLS_LISTEN = "0.0.0.0:443"
HSTS_DEFAULT_MAX_AGE = 31536000            # one year, what `hsts = true` means
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
CERTS_DIR = "certs"                        # under .changeover/: ACME certificates (0600)
CHALLENGES_DIR = "acme-challenges"         # under .changeover/: HTTP-01 tokens the proxy answers
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z)(?:{_LABEL}\.)*{_LABEL}\Z")


@dataclass(frozen=True)
class TlsSettings:
    listen: str = DEFAULT_TLS_LISTEN
    # (cert, key) PEM paths, the first is served to clients without SNI or with an unknown name;
    # key "" means the key is in the cert file (how ACME certificates are stored: one atomic file)
    certificates: tuple[tuple[str, str], ...] = ()
    # certificate files the ACME client writes: missing at first start, served as a temporary
    # self-signed certificate until they exist
    managed: tuple[str, ...] = ()
    https_redirect: bool = False
    hsts_max_age: int = 0                  # 0: no Strict-Transport-Security header
    min_version: str = "1.2"
    challenge_dir: str = ""                # HTTP-01 tokens, "" when ACME is off

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> TlsSettings:
        """From its JSON form (lists where the dataclass has tuples)."""
        fields = dict(data)
        fields["certificates"] = tuple((str(c), str(k)) for c, k in fields.get("certificates", ()))
        fields["managed"] = tuple(fields.get("managed", ()))
        return cls(**fields)


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETS_ENCRYPT
    email: str = ""
    hosts: tuple[str, ...] = ()
    ca_bundle: str = ""                    # PEM to verify the ACME server's HTTPS (a test CA such as pebble)
    renew_before: float = 0.0              # seconds before expiry; 0: at 2/3 of the lifetime
    certs_dir: str = ""
    challenge_dir: str = ""

    def cert_path(self, host: str) -> str:
        return str(Path(self.certs_dir) / f"{host}.pem")


def _listen(t: Table, default: str) -> str:
    v: str = t.str("listen", default)
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}", v) or not 0 < int(v.rsplit(":", 1)[1]) < 65536:
        raise t.error("listen", "HOST:PORT, e.g. '0.0.0.0:443'", v)
    return v


def _file(t: Table, key: str, v: str, root: Path) -> str:
    path = (root / v).absolute()
    if not path.is_file():
        raise t.error(key, "a readable PEM file (no such file)", v)
    return str(path)


def _pair(t: Table, root: Path) -> tuple[str, str] | None:
    """cert and key (PEM files), or None when the table names neither."""
    cert, key = t.str("cert", ""), t.str("key", "")
    if not cert and not key:
        return None
    if not cert:
        raise t.error("cert", "cert and key together (PEM files)")
    cert_path = _file(t, "cert", cert, root)
    if not key:                        # one PEM with the key and the chain, as ACME's are stored
        try:
            has_key = b"PRIVATE KEY-----" in Path(cert_path).read_bytes()
        except OSError:
            has_key = False
        if not has_key:
            raise t.error("key", "cert and key together (PEM files), or a cert file that holds the key too")
        return cert_path, ""
    return cert_path, _file(t, "key", key, root)


def _hsts(t: Table) -> int:
    v = t.raw("hsts", False)
    if v is True:
        return HSTS_DEFAULT_MAX_AGE
    if v is False:
        return 0
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str):                  # a duration: "8760h"
        try:
            seconds = int(parse_duration(v))
        except ValueError:
            seconds = 0
        if seconds > 0:
            return seconds
    raise t.error("hsts", "true, false or a max-age in seconds (e.g. 31536000, or a duration like \"8760h\")", v)


def load(t: Table, root: Path, state_dir: Path, default_hosts: tuple[str, ...] = ()
         ) -> tuple[TlsSettings | None, AcmeSettings | None]:
    """[proxy.tls] -> (TlsSettings, AcmeSettings); (None, None) when the table is absent.
    Relative paths are read from the config file's directory; ACME `hosts` default to
    `default_hosts` ([proxy] hosts without wildcards)."""
    if not t.data:
        t.finish()
        return None, None
    listen = _listen(t, DEFAULT_TLS_LISTEN)
    first = _pair(t, root)
    pairs: list[tuple[str, str]] = [first] if first else []
    for item in t.tables("certificates"):
        pair = _pair(item, root)
        if pair is None:
            raise item.error("cert", "cert and key (PEM files)")
        pairs.append(pair)
        item.finish()
    acme: AcmeSettings | None = None
    managed: tuple[str, ...] = ()
    challenge_dir = ""
    if t.bool("acme", False):
        hosts = t.str_list("hosts", list(default_hosts))
        if not hosts:
            raise t.error("hosts", "the host names to get certificates for, e.g. [\"shop.example.com\"] "
                          "(or [proxy] hosts)")
        for h in hosts:
            if not _HOSTNAME.match(h.lower()):
                raise t.error("hosts", "host names (ACME over HTTP-01 cannot issue wildcards or IP addresses)", h)
        bundle = t.str("acme_ca_bundle", "")
        acme = AcmeSettings(
            directory=t.str("acme_directory", LETS_ENCRYPT), email=t.str("acme_email", ""),
            hosts=tuple(h.lower() for h in dict.fromkeys(hosts)),
            ca_bundle=_file(t, "acme_ca_bundle", bundle, root) if bundle else "",
            renew_before=t.duration("acme_renew_before", 0.0),
            certs_dir=str(state_dir / CERTS_DIR), challenge_dir=str(state_dir / CHALLENGES_DIR))
        if not acme.directory.startswith(("https://", "http://")):
            raise t.error("acme_directory", "the ACME directory URL, e.g. " + LETS_ENCRYPT, acme.directory)
        managed = tuple(acme.cert_path(h) for h in acme.hosts)
        pairs += [(m, "") for m in managed]
        challenge_dir = acme.challenge_dir
    else:
        for key in ("hosts", "acme_email", "acme_directory", "acme_ca_bundle", "acme_renew_before"):
            if t.has(key):
                raise t.error(key, "acme = true for the ACME keys to mean anything")
    if not pairs:
        raise t.error("cert", "a certificate (cert and key, or [[proxy.tls.certificates]]) or acme = true")
    min_version = t.str("min_version", "1.2", choices=("1.2", "1.3"))
    settings = TlsSettings(listen=listen, certificates=tuple(pairs), managed=managed,
                           https_redirect=t.bool("https_redirect", False), hsts_max_age=_hsts(t),
                           min_version=min_version, challenge_dir=challenge_dir)
    t.finish()
    return settings, acme
