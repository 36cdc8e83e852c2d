"""`[fleet]` in changeover.toml: several hosts deploy as one, coordinated through etcd.

    [fleet]
    etcd = ["http://10.0.0.5:2379", "http://10.0.0.6:2379", "http://10.0.0.7:2379"]
    name = "web-1"              # this host in the fleet (default: the host name)
    prefix = "shop"             # several apps share one etcd
    min_ready = 3               # hosts that must be prepared before the switch (default: all)
    health_listen = "0.0.0.0:8001"   # the load balancer's health check (default: proxy port + 1)
    ca_file = "..."  cert_file = "..."  key_file = "..."   # TLS to etcd
    user = "changeover"  password = "${ETCD_PASSWORD}"     # etcd auth

`load()` is called by `config.load()` with the `[fleet]` table; `peek()` reads only `[fleet]` from
a file, for the controls (`status`, `rollback`, ...) that must work while the rest is being edited.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

from changeover.errors import ConfigError
from changeover.tables import Table

DEFAULT_PREFIX = "default"
DEFAULT_LOCK_TTL = 10.0
DEFAULT_HOST_TTL = 3.0
DEFAULT_PREPARE_TIMEOUT = 300.0
DEFAULT_SWITCH_TIMEOUT = 10.0
HEALTH_PATH = "/_changeover/health"


@dataclass(frozen=True)
class FleetConfig:
    etcd: tuple[str, ...]
    name: str
    prefix: str = DEFAULT_PREFIX
    min_ready: int | None = None            # None: every registered host
    health_listen: str | None = None        # None: the proxy's host, its port + 1; "" turns it off
    health_path: str = HEALTH_PATH
    lock_ttl: float = DEFAULT_LOCK_TTL      # a dead coordinator's lock is free after this
    host_ttl: float = DEFAULT_HOST_TTL      # a host cut off counts as gone after this
    prepare_timeout: float = DEFAULT_PREPARE_TIMEOUT
    switch_timeout: float = DEFAULT_SWITCH_TIMEOUT
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def root(self) -> str:
        """Every key of this fleet starts with this."""
        return f"/changeover/{self.prefix}/"


def load(t: Table) -> FleetConfig | None:
    """The [fleet] table (None when there is none)."""
    if not t.data:
        return None
    etcd = t.str_list("etcd", nonempty=True)
    for i, url in enumerate(etcd):
        if not re.fullmatch(r"https?://[^/\s]+(:\d{1,5})?/?", url):
            raise ConfigError(f"expected an etcd client URL like 'http://10.0.0.5:2379', got {url!r}",
                              file=t.file, key=f"{t.key_name('etcd')}[{i}]")
    name = t.str("name", socket.gethostname())
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
        raise t.error("name", "a host name of letters, digits, '.', '_' and '-'", name)
    prefix = t.str("prefix", DEFAULT_PREFIX)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", prefix):
        raise t.error("prefix", "a name of letters, digits, '.', '_' and '-'", prefix)
    health = t.str("health_listen", None)
    if health and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}", health):
        raise t.error("health_listen", "HOST:PORT, or \"\" for none", health)
    health_path = t.str("health_path", HEALTH_PATH)
    if not health_path.startswith("/"):
        raise t.error("health_path", "a path starting with '/'", health_path)
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        v = t.str(key, None)
        if v is not None and not os.path.isfile(v):
            raise t.error(key, "a readable file", v)
        files[key] = v
    if files["key_file"] and not files["cert_file"]:
        raise t.error("key_file", "cert_file as well (a client certificate and its key)")
    user, password = t.str("user", None), t.str("password", None)
    if password is not None and user is None:
        raise t.error("password", "user as well")
    cfg = FleetConfig(
        etcd=tuple(etcd), name=name, prefix=prefix, min_ready=t.int("min_ready", None, min=1),
        health_listen=health, health_path=health_path,
        lock_ttl=_at_least(t, "lock_ttl", DEFAULT_LOCK_TTL, 2.0),
        host_ttl=_at_least(t, "host_ttl", DEFAULT_HOST_TTL, 2.0),
        prepare_timeout=_at_least(t, "prepare_timeout", DEFAULT_PREPARE_TIMEOUT, 1.0),
        switch_timeout=_at_least(t, "switch_timeout", DEFAULT_SWITCH_TIMEOUT, 0.5),
        ca_file=files["ca_file"], cert_file=files["cert_file"], key_file=files["key_file"],
        user=user, password=password)
    t.finish()
    return cfg


def _at_least(t: Table, key: str, default: float, low: float) -> float:
    v: float = t.duration(key, default)
    if v < low:
        raise t.error(key, f"a duration of at least {low:g}s", v)
    return v


def peek(path: str | os.PathLike[str]) -> FleetConfig | None:
    """Only [fleet] of a config file, for the controls of a running fleet. A file that cannot be
    parsed has no fleet unless it visibly declares one: then its error is raised, since acting on
    one host alone would split the fleet."""
    from changeover import config as config_mod

    file = Path(getattr(config_mod, "find_config", Path)(path)).absolute()
    try:
        text = file.read_text()
    except OSError:
        return None
    declares = re.search(r"^\s*\[fleet\]", text, re.M) is not None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        if declares:
            raise ConfigError(f"invalid TOML: {e} (the [fleet] controls need it readable)", file=str(path)) from None
        return None
    if "fleet" not in raw:
        return None
    env = config_mod.read_dotenv(file.parent / ".env")
    env.update(os.environ)
    data = config_mod.interpolate(raw["fleet"], env, str(path), "fleet")
    if not isinstance(data, dict):
        raise ConfigError("expected a table", file=str(path), key="fleet")
    return load(Table(str(path), "fleet", data))
