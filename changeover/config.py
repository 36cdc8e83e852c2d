"""changeover.toml -> typed, validated objects.

Strings may use ${VAR} and ${VAR:-default}, resolved from the environment and an optional `.env`
file beside the config (the real environment wins). `$PORT`/`${PORT}` are left alone: each app
instance gets its own port from the supervisor. `$$` is a literal dollar.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover import sockets
from changeover.checks import config as checks_config
from changeover.dashboard import config as dashboard_config
from changeover.errors import ConfigError
from changeover.fleet import config as fleet_config
from changeover.migrations import config as migrations_config
from changeover.monitor import config as monitor_config
from changeover.proxy import tls_settings
from changeover.proxy.base import ProxySettings
from changeover.releases import MARKER, BuildConfig, ReleasesConfig, load_build, load_releases
from changeover.retention import LogsConfig, StateRetention, load_logs, load_state
from changeover.tables import Table

DEFAULT_CONFIG = "changeover.toml"
STATE_DIR_NAME = ".changeover"
DEFAULT_HEALTH_PATH = "/health"
DEFAULT_INSTANCES = 1
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_HEALTH_INTERVAL = 0.2
DEFAULT_HEALTHY_THRESHOLD = 3   # consecutive 2xx before an instance counts as ready
RESERVED_VARS = frozenset({"PORT"})

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class AppConfig:
    command: tuple[str, ...]
    health_path: str = DEFAULT_HEALTH_PATH
    instances: int = DEFAULT_INSTANCES
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    healthy_threshold: int = DEFAULT_HEALTHY_THRESHOLD
    build: BuildConfig = field(default_factory=BuildConfig)   # [app] build, build_timeout, build_cache (releases.py)


@dataclass(frozen=True)
class Config:
    file: Path
    app: AppConfig | None     # None: a file with only [migrations] (the migrate commands need no app)
    env: dict[str, str]
    proxy: ProxySettings
    migrations: migrations_config.MigrationsConfig
    checks: checks_config.ChecksConfig
    monitor: monitor_config.MonitorConfig
    resolved: dict[str, Any] = field(default_factory=dict, compare=False)  # for `config check`
    dashboard: dashboard_config.DashboardConfig = field(default_factory=dashboard_config.DashboardConfig)  # [dashboard]
    fleet: fleet_config.FleetConfig | None = None   # [fleet] (changeover/fleet)
    releases: ReleasesConfig = field(default_factory=ReleasesConfig)   # [releases] (releases.py)
    retention: StateRetention = field(default_factory=StateRetention)   # [state] (retention.py)
    logs: LogsConfig = field(default_factory=LogsConfig)   # [logs] (retention.py)
    acme: tls_settings.AcmeSettings | None = None   # [proxy.tls] acme = true (changeover/certs)

    @property
    def root(self) -> Path:
        return self.file.parent

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR_NAME

    @property
    def socket_path(self) -> Path:
        return sockets.place(self.state_dir, "control.sock")


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; `export ` prefix, quotes and # comments allowed."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=str(path)) from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError("expected KEY=VALUE", file=str(path), key=f"line {n}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


def interpolate(value: Any, env: dict[str, str], file: str, key: str) -> Any:
    """Resolve ${VAR} in every string of a TOML value, naming the key when a variable is unset."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, file, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$$"  # kept; unescaped below so it cannot start a new reference
        name, default = m.group(1), m.group(2)
        if name in RESERVED_VARS:
            return m.group(0)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set (use ${{{name}:-default}} for a default)",
                          file=file, key=key)

    return _VAR.sub(sub, value).replace("$$", "$")


CONFIG_ENV = "CHANGEOVER_CONFIG"


def find_config(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> Path:
    """The file meant by `-c PATH`. Only the default name is looked for: `$CHANGEOVER_CONFIG` when
    set, else the nearest `changeover.toml` in the working directory or above it (so `npm run
    db:migrate:safe` works from inside a release; a release directory's own copy, exported with
    its code, is passed over), else the name as given (its error says so)."""
    if str(path) != DEFAULT_CONFIG:
        return Path(path)
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    here = Path.cwd()
    for d in (here, *here.parents):
        if (d / DEFAULT_CONFIG).is_file() and not (d / MARKER).exists():
            return d / DEFAULT_CONFIG
    return Path(path)


def load(path: str | os.PathLike[str] = DEFAULT_CONFIG, environ: dict[str, str] | None = None) -> Config:
    path = find_config(path)
    file = Path(path).absolute()
    name = str(path)
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError("no such file (create one, or pass -c PATH)", file=name) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a TOML file", file=name) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=name) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", file=name) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", file=name) from None

    env = read_dotenv(file.parent / ".env")
    env.update(os.environ if environ is None else environ)
    resolved = interpolate(raw, env, name, "")
    top = Table(name, "", resolved)

    app = _app(top.table("app")) if top.has("app") or not top.has("migrations") else None

    app_env = top.str_map("env", {})

    p = top.table("proxy")
    d = ProxySettings()
    listen = p.str("listen", d.listen)
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}", listen) or not 0 < int(
            listen.rsplit(":", 1)[1]) < 65536:
        raise p.error("listen", "HOST:PORT, e.g. '127.0.0.1:8000'", listen)
    proxy = ProxySettings(
        listen=listen,
        drain_timeout=p.duration("drain_timeout", d.drain_timeout),
        header_timeout=p.duration("header_timeout", d.header_timeout),
        body_timeout=p.duration("body_timeout", d.body_timeout),
        idle_timeout=p.duration("idle_timeout", d.idle_timeout),
        tunnel_idle_timeout=p.duration("tunnel_idle_timeout", d.tunnel_idle_timeout),   # 0 = never
        connect_timeout=p.duration("connect_timeout", d.connect_timeout),
        response_timeout=p.duration("response_timeout", d.response_timeout),
        max_header_bytes=p.int("max_header_bytes", _default_head_bytes(p), min=1024),
        max_body_bytes=p.int("max_body_bytes", d.max_body_bytes, min=0),
        retries=p.int("retries", d.retries, min=0, max=10),
        engine=_engine(p),
        haproxy_socket=p.str("haproxy_socket", "") or None,
        trusted_proxies=_cidrs(p, "trusted_proxies", d.trusted_proxies),
        health_path=_health_path(p, d.health_path),   # the load balancer's check (proxy/embedded.py)
        pause_timeout=_pause_timeout(p, d.pause_timeout),   # `changeover pause` (proxy/hold.py)
        pause_max_held=p.int("pause_max_held", d.pause_max_held, min=1, max=1_000_000),
        maintenance_page=_maintenance_page(p, file.parent),
        retry_after=p.int("retry_after", d.retry_after, min=0, max=86400),
        max_idle_per_instance=p.int("max_idle_per_instance", d.max_idle_per_instance, min=1),
        workers=p.int("workers", os.cpu_count() or 1, min=1, max=256),   # proxy processes (proxy/workers.py)
        hosts=_hosts(p),
        shared=p.bool("shared", d.shared),             # attach to a shared front (proxy/front.py)
        front_socket=p.str("front_socket", d.front_socket),
    )
    _check_shared(p, proxy)
    tls, acme = _tls(p, proxy, file.parent)
    proxy = dataclasses.replace(proxy, tls=tls)
    p.finish()

    migrations = migrations_config.load(top.table("migrations"), env)
    checks = checks_config.load(top.table("checks"), env)
    monitor = monitor_config.load(top.table("monitor"), top.table("notify"), env)
    proxy = dataclasses.replace(proxy, routes=monitor.routes, max_routes=monitor.max_routes)
    dashboard = dashboard_config.load(top.table("dashboard"))
    fleet = fleet_config.load(top.table("fleet"))
    releases = load_releases(top.table("releases"))
    retention, logs = load_state(top.table("state")), load_logs(top.table("logs"))
    top.finish()
    return Config(file=file, app=app, env=app_env, proxy=proxy, acme=acme,
                  fleet=fleet,
                  migrations=migrations, checks=checks, monitor=monitor, resolved=resolved, releases=releases,
                  dashboard=dashboard, retention=retention, logs=logs)


def _hosts(p: Table) -> tuple[str, ...]:
    from changeover.proxy.routes import normalize_host

    out: list[str] = []
    for v in p.str_list("hosts", []):
        try:
            name = normalize_host(v)
        except ValueError:
            raise p.error("hosts", 'host names like "shop.example.com", "*.example.com" or "*"', v) from None
        if name not in out:
            out.append(name)
    return tuple(out)


def _check_shared(p: Table, proxy: ProxySettings) -> None:
    """A shared front routes by host name: a project on it must name its hosts."""
    if proxy.shared and not proxy.hosts:
        raise p.error("hosts", "at least one host name when shared = true (the front routes by Host)", [])
    if proxy.hosts and proxy.engine != "embedded":
        raise p.error("hosts", 'no host names with engine = "haproxy" (host routing is the embedded proxy\'s)',
                      list(proxy.hosts))
    if proxy.front_socket and not proxy.front_socket.startswith("/"):
        raise p.error("front_socket", "an absolute path to the shared front's control socket", proxy.front_socket)


def _tls(p: Table, proxy: ProxySettings, root: Path) -> tuple[tls_settings.TlsSettings | None,
                                                             tls_settings.AcmeSettings | None]:
    """[proxy.tls] (proxy/tls_settings.py); the embedded proxy terminates TLS, HAProxy here does not."""
    t = p.table("tls")
    if t.data and proxy.engine != "embedded":
        raise ConfigError('is only served by engine = "embedded" (terminate TLS in front of HAProxy, or use the '
                          'embedded proxy)', file=t.file, key="proxy.tls")
    names = tuple(h for h in proxy.hosts if "*" not in h)   # ACME's default: [proxy] hosts, no wildcards
    return tls_settings.load(t, root, root / STATE_DIR_NAME, names)


def _health_path(t: Table, default: str) -> str:
    v: str = t.str("health_path", default)
    if v and (not v.startswith("/") or any(c.isspace() or c in "?#" for c in v)):
        raise t.error("health_path", "a path starting with '/' (no spaces, '?' or '#'), or \"\" for none", v)
    return v


def _pause_timeout(t: Table, default: float) -> float:
    v: float = t.duration("pause_timeout", default)
    if not 0 < v <= 3600:
        raise t.error("pause_timeout", "a duration above 0 and at most 1h, e.g. '30s'", v)
    return v


def _maintenance_page(t: Table, root: Path) -> str:
    """[proxy] maintenance_page: the HTML file `maintenance on` serves (relative to the config
    file), read when maintenance is switched on; "" for the built-in page."""
    v: str = t.str("maintenance_page", "")
    if not v:
        return ""
    path = (root / v).expanduser()
    if not path.is_file():
        raise t.error("maintenance_page", "an HTML file that exists (relative to changeover.toml)", v)
    return str(path.absolute())


def _app(t: Table) -> AppConfig:
    command = t.str_list("command", nonempty=True)
    health_path = t.str("health_path", DEFAULT_HEALTH_PATH)
    if not health_path.startswith("/"):
        raise t.error("health_path", "a path starting with '/'", health_path)
    app = AppConfig(
        command=tuple(command),
        health_path=health_path,
        instances=t.int("instances", DEFAULT_INSTANCES, min=1, max=64),
        ready_timeout=t.duration("ready_timeout", DEFAULT_READY_TIMEOUT),
        stop_timeout=t.duration("stop_timeout", DEFAULT_STOP_TIMEOUT),
        health_interval=t.duration("health_interval", DEFAULT_HEALTH_INTERVAL),
        healthy_threshold=t.int("healthy_threshold", DEFAULT_HEALTHY_THRESHOLD, min=1),
        build=load_build(t),
    )
    t.finish()
    return app


def require_app(config: Config) -> AppConfig:
    """The [app] table, for what runs the app; a migrations-only file gets a clear error."""
    if config.app is None:
        raise ConfigError("is required to run the app (command, health_path); a file with only "
                          "[migrations] serves the `changeover migrate` commands", file=str(config.file), key="app")
    return config.app


@dataclass(frozen=True)
class Location:
    """Where a config file's daemon lives, found from the file's path alone: `status`, `rollback`
    and the other controls of a running daemon work whatever the file now says."""

    file: Path

    @property
    def root(self) -> Path:
        return self.file.parent

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR_NAME

    @property
    def socket_path(self) -> Path:
        return sockets.place(self.state_dir, "control.sock")


def locate(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> Location:
    path = find_config(path)
    file = Path(path).absolute()
    if not file.is_file():
        # Its contents are not read (they may be mid-edit), but a file that is not there at all is
        # a wrong -c, not a daemon that is down.
        raise ConfigError("no such file (create one, or pass -c PATH)", file=str(path))
    return Location(file)


def _default_head_bytes(p: Table) -> int:
    """HAProxy sizes every buffer to the longest head it accepts: 64 KB heads cost it ~30 % more
    CPU per request than its own 16 KB buffers (docs/benchmarks.md), so that engine keeps them."""
    from changeover.proxy.base import DEFAULT_HAPROXY_MAX_HEADER_BYTES

    haproxy = p.data.get("engine") == "haproxy"     # (the key itself is read and checked by _engine)
    return DEFAULT_HAPROXY_MAX_HEADER_BYTES if haproxy else ProxySettings().max_header_bytes


def _engine(p: Table) -> str:
    from changeover.proxy.control import ENGINES

    engine = p.str("engine", ProxySettings().engine)
    if engine not in ENGINES:
        raise p.error("engine", " or ".join(f'"{e}"' for e in ENGINES), engine)
    return str(engine)


def _cidrs(p: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    import ipaddress

    values = p.str_list(key, list(default))
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise p.error(key, "a list of CIDRs, e.g. [\"10.0.0.0/8\", \"::1/128\"]", v) from None
    return tuple(str(ipaddress.ip_network(v, strict=False)) for v in values)


def release_env(config: Config, version: str | None, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The one definition of a release's environment: [env], then `deploy --env` overrides,
    API_VERSION defaulting to the release version. Recorded with the release, so a rollback
    restores it; checks, probes and migrations read DATABASE_URL from it."""
    out = dict(config.env)
    out.update(overrides or {})
    if version is not None:
        out.setdefault("API_VERSION", version)
    return out


def process_env(env: dict[str, str]) -> dict[str, str]:
    """What an app process (or a check run by hand) sees: the daemon's environment (PATH, HOME,
    LANG...) under the release's own, as a user starting the app from a shell expects."""
    return {**os.environ, **env}
