"""Secrets never reach a screen, a log or the state file in clear."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_QUERY_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd|token|secret)=([^&\s;]+)")
MASK = "***"


def redact_text(text: str) -> str:
    """Passwords in URLs (scheme://user:pw@host) and password=/token= parameters are masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group(1)}={MASK}", text)


def redact_value(key: str, value: str) -> str:
    if SECRET_KEY.search(key):
        return MASK if value else value
    return redact_text(value)


def redact_obj(obj: Any, key: str = "") -> Any:
    """Deep copy of JSON-like data with secrets masked, by key name or by URL shape."""
    if isinstance(obj, dict):
        return {k: redact_obj(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v, key) for v in obj]
    if isinstance(obj, str):
        return redact_value(key, obj)
    return obj
