"""Which `ProxyControl` carries the traffic: `[proxy] engine` picks it."""

from __future__ import annotations

from pathlib import Path

from changeover.errors import ConfigError
from changeover.proxy.base import ProxySettings
from changeover.proxy.control import ENGINES, ProxyControl


def make_control(settings: ProxySettings, state_dir: Path, config_file: str = "") -> ProxyControl:
    """The data plane of `settings.engine`, not started yet (the daemon calls `ensure()`)."""
    if settings.shared:                # this project's routes on a front shared with others
        from changeover.proxy.shared import SharedFront
        return SharedFront(settings, state_dir, config_file)
    if settings.engine == "embedded":
        from changeover.proxy.remote import ProxyProcess
        return ProxyProcess(settings, state_dir)
    if settings.engine == "haproxy":
        from changeover.proxy.haproxy_engine import HAProxyControl
        return HAProxyControl(settings, state_dir)
    raise ConfigError(f"expected {' or '.join(repr(e) for e in ENGINES)}, got {settings.engine!r}",
                      key="proxy.engine")
