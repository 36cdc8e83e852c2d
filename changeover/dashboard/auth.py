"""Who may use the dashboard: one login token, signed session cookies, CSRF tokens.

The token is made at the daemon's first start and kept in `.changeover/dashboard.token` (0600,
beside the control socket that is just as powerful); `changeover dashboard` shows it as a login
URL. A session is `<issued>.<nonce>.<mac>`, signed with a key derived from the token: nothing
to store, it survives a daemon restart, and a new token (delete the file, restart) ends every
session at once. The CSRF token is another MAC of the session, so a page from another origin
can neither read nor forge it. Every comparison is constant-time (hmac.compare_digest over
digests of equal length, whatever was presented).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from changeover.errors import ConfigError, DaemonError

TOKEN_FILE = "dashboard.token"
URL_FILE = "dashboard.url"       # where the running dashboard listens (written by the daemon)
COOKIE = "changeover_session"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL = 12 * 3600.0     # a login lasts a working day


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def read_token(state_dir: Path) -> str | None:
    try:
        return token_path(state_dir).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read the dashboard token: {e.strerror}", file=str(token_path(state_dir))) from None


def ensure_token(state_dir: Path) -> str:
    """The login token, made on first use: 0600 from its first byte (never world-readable)."""
    existing = read_token(state_dir)
    if existing:
        os.chmod(token_path(state_dir), 0o600)   # tightened if someone loosened it
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path = token_path(state_dir)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def same(presented: str, expected: str) -> bool:
    """Constant-time equality: both sides are hashed first, so neither the content nor the length
    of what was presented changes how long the comparison takes."""
    return hmac.compare_digest(_digest(presented), _digest(expected))


class Keys:
    """Sessions and CSRF tokens signed with keys derived from the login token."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        self.token = token
        self._session_key = hmac.new(_digest(token), b"changeover dashboard session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(_digest(token), b"changeover dashboard csrf", hashlib.sha256).digest()
        self.clock = clock

    def check_token(self, presented: str) -> bool:
        return same(presented, self.token)

    def new_session(self) -> str:
        body = f"{int(self.clock())}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._mac(self._session_key, body)}"

    def valid_session(self, cookie: str | None) -> bool:
        if not cookie or cookie.count(".") != 2:
            return False
        issued, _, _ = cookie.partition(".")
        body, _, mac = cookie.rpartition(".")
        if not same(mac, self._mac(self._session_key, body)):
            return False
        try:
            age = self.clock() - int(issued)
        except ValueError:
            return False
        return 0 <= age < SESSION_TTL

    def csrf(self, cookie: str) -> str:
        return self._mac(self._csrf_key, cookie)

    def valid_csrf(self, cookie: str | None, presented: str | None) -> bool:
        if not cookie or not presented:
            return False
        return same(presented, self.csrf(cookie))

    @staticmethod
    def _mac(key: bytes, body: str) -> str:
        return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def login_url(state_dir: Path) -> str:
    """What `changeover dashboard` prints: the running dashboard's URL with the token in its
    fragment (#token=...), which browsers never send to a server, so no log ever holds it."""
    try:
        url = (state_dir / URL_FILE).read_text().strip()
    except FileNotFoundError:
        raise DaemonError("the dashboard is not running: it is served by the daemon (`changeover serve`), unless "
                          "[dashboard] listen = \"\" disables it, or its port was taken (see .changeover/daemon.log)"
                          ) from None
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=2).close()
    except OSError:
        raise DaemonError(f"nothing answers at {url}: has the daemon stopped? (`changeover serve`)") from None
    token = read_token(state_dir)
    if token is None:
        raise DaemonError(f"no dashboard token in {token_path(state_dir)}: restart the daemon to make one")
    return f"{url}/login#token={token}"
