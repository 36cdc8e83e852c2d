"""Secrets never reach a screen, a log or the state file in clear.

Two kinds of masking:

- by shape: passwords in URLs (scheme://user:pw@host) and password=/token= parameters;
- by value: every value of a secret-named environment key (`*TOKEN*`, `*SECRET*`, `*PASSWORD*`,
  `*KEY*`, ...) and every password of a URL in any value is remembered (`remember_env`) and
  masked wherever it appears afterwards, however the app prints it (`API_TOKEN=tok_…`,
  `Bearer tok_…`, a JSON dump of its settings). The daemon remembers the env of every release it
  starts or reads from its state, so deploy output, history and daemon.log are masked alike.

Values shorter than MIN_SECRET characters are not masked by value: masking every "1" or "dev"
would make the output unreadable, and such a value protects nothing anyway.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_KEY = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|KEY|CREDENTIAL", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_QUERY_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd|token|secret)=([^&\s;]+)")
MASK = "***"
MIN_SECRET = 4

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None


def secret_values(env: Mapping[str, str]) -> set[str]:
    """The values of env that are secrets: those of secret-named keys, and URL passwords."""
    out = set()
    for key, value in env.items():
        if not isinstance(value, str):
            continue
        if SECRET_KEY.search(str(key)):
            out.add(value)
        for m in _URL_PASSWORD.finditer(value):
            out.add(m["pw"])
    return {v for v in out if len(v) >= MIN_SECRET and v != MASK}


def remember(values: Iterable[str]) -> None:
    """Mask these values wherever they appear from now on (in this process)."""
    global _pattern
    new = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET and v != MASK}
    with _lock:
        if new <= _values:
            return
        _values.update(new)
        # Longest first, so a secret that contains another is masked whole.
        _pattern = re.compile("|".join(re.escape(v) for v in sorted(_values, key=len, reverse=True)))


def remember_env(env: Mapping[str, str]) -> None:
    remember(secret_values(env))


def forget_all() -> None:
    """For tests: start from no remembered values."""
    global _pattern
    with _lock:
        _values.clear()
        _pattern = None


def redact_text(text: str) -> str:
    """Remembered secret values, passwords in URLs and password=/token= parameters are masked."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group(1)}={MASK}", text)


def redact_value(key: str, value: str) -> str:
    if SECRET_KEY.search(key):
        return MASK if value else value
    return redact_text(value)


def redact_obj(obj: Any, key: str = "") -> Any:
    """Deep copy of JSON-like data with secrets masked, by key name, by value or by URL shape."""
    if isinstance(obj, dict):
        return {k: redact_obj(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v, key) for v in obj]
    if isinstance(obj, str):
        return redact_value(key, obj)
    return obj


def redact_json(obj: Any) -> Any:
    """Like redact_obj, but masks strings by value and shape only, never by their key's name: for
    records whose keys are field names (`detail`, `reason`), not settings."""
    if isinstance(obj, dict):
        return {k: redact_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_json(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFormatter(logging.Formatter):
    """A log line, traceback included, is masked as a whole before it is written."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
