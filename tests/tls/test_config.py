"""[proxy.tls] in changeover.toml: what it becomes, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeover import config
from changeover.errors import ConfigError
from changeover.proxy.tls_settings import HSTS_DEFAULT_MAX_AGE


def load(tmp_path: Path, tls: str, proxy: str = "") -> config.Config:
    for name in ("site.pem", "site.key", "admin.pem", "admin.key"):
        (tmp_path / name).write_text("")
    f = tmp_path / "changeover.toml"
    f.write_text(f'[app]\ncommand = ["true"]\n[proxy]\n{proxy}\n[proxy.tls]\n{tls}\n')
    return config.load(f, environ={})


def test_certificates_and_defaults(tmp_path: Path) -> None:
    c = load(tmp_path, 'cert = "site.pem"\nkey = "site.key"\nhttps_redirect = true\nhsts = true\n'
                       '[[proxy.tls.certificates]]\ncert = "admin.pem"\nkey = "admin.key"\n')
    t = c.proxy.tls
    assert t is not None and c.acme is None
    assert t.listen == "0.0.0.0:443"
    assert t.certificates == ((str(tmp_path / "site.pem"), str(tmp_path / "site.key")),
                              (str(tmp_path / "admin.pem"), str(tmp_path / "admin.key")))
    assert (t.https_redirect, t.hsts_max_age, t.min_version) == (True, HSTS_DEFAULT_MAX_AGE, "1.2")
    short = load(tmp_path, 'cert = "site.pem"\nkey = "site.key"\nhsts = 600').proxy.tls
    assert short is not None and short.hsts_max_age == 600
    year = load(tmp_path, 'cert = "site.pem"\nkey = "site.key"\nhsts = "8760h"').proxy.tls
    assert year is not None and year.hsts_max_age == 8760 * 3600
    assert config.load(tmp_path / "changeover.toml").proxy.tls is not None
    f = tmp_path / "changeover.toml"
    f.write_text('[app]\ncommand = ["true"]\n')
    assert config.load(f).proxy.tls is None


def test_acme(tmp_path: Path) -> None:
    c = load(tmp_path,
             'acme = true\nhosts = ["Shop.Example.com", "www.example.com"]\nacme_email = "ops@example.com"\n'
             'acme_renew_before = "720h"\nacme_directory = "https://127.0.0.1:14000/dir"')
    assert c.acme is not None and c.proxy.tls is not None
    assert c.acme.hosts == ("shop.example.com", "www.example.com")
    assert c.acme.renew_before == 720 * 3600
    state = tmp_path / ".changeover"
    assert c.proxy.tls.managed == (str(state / "certs" / "shop.example.com.pem"),
                                   str(state / "certs" / "www.example.com.pem"))
    assert c.proxy.tls.challenge_dir == str(state / "acme-challenges")


def test_one_file_with_the_key_and_the_chain(tmp_path: Path) -> None:
    load(tmp_path, 'cert = "site.pem"\nkey = "site.key"')      # writes the empty files
    (tmp_path / "both.pem").write_text("-----BEGIN PRIVATE KEY-----\n...\n-----BEGIN CERTIFICATE-----\n")
    c = load(tmp_path, 'cert = "both.pem"')
    assert c.proxy.tls is not None and c.proxy.tls.certificates == ((str(tmp_path / "both.pem"), ""),)


def test_acme_hosts_default_to_the_proxy_hosts(tmp_path: Path) -> None:
    c = load(tmp_path, "acme = true", 'hosts = ["shop.example.com", "*.example.com"]')
    assert c.acme is not None and c.acme.hosts == ("shop.example.com",)


@pytest.mark.parametrize(("tls", "proxy", "key", "words"), [
    ('cert = "site.pem"', "", "proxy.tls.key", "cert and key together"),
    ('cert = "missing.pem"\nkey = "site.key"', "", "proxy.tls.cert", "no such file"),
    ('listen = "443"\ncert = "site.pem"\nkey = "site.key"', "", "proxy.tls.listen", "HOST:PORT"),
    ('https_redirect = true', "", "proxy.tls.cert", "acme = true"),
    ('acme = true', "", "proxy.tls.hosts", "host names"),
    ('acme = true\nhosts = ["*.example.com"]', "", "proxy.tls.hosts", "wildcards"),
    ('hosts = ["a.example.com"]\ncert = "site.pem"\nkey = "site.key"', "", "proxy.tls.hosts", "acme = true"),
    ('hsts = "yes"\ncert = "site.pem"\nkey = "site.key"', "", "proxy.tls.hsts", "max-age"),
    ('min_version = "1.0"\ncert = "site.pem"\nkey = "site.key"', "", "proxy.tls.min_version", "1.2"),
    ('cert = "site.pem"\nkey = "site.key"\ncertz = 1', "", "proxy.tls.certz", "unknown key"),
    ('cert = "site.pem"\nkey = "site.key"', 'engine = "haproxy"', "proxy.tls", 'engine = "embedded"'),
])
def test_errors_name_the_key(tmp_path: Path, tls: str, proxy: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, tls, proxy)
    assert e.value.key == key
    assert words in str(e.value)
