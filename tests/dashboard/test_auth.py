"""The login token, sessions and CSRF tokens (changeover/dashboard/auth.py)."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from changeover.dashboard import auth
from changeover.errors import DaemonError


def test_the_token_is_made_once_0600_and_kept(tmp_path: Path) -> None:
    state = tmp_path / ".changeover"
    token = auth.ensure_token(state)
    path = auth.token_path(state)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(token) >= 40 and auth.ensure_token(state) == token
    os.chmod(path, 0o644)        # loosened by hand: tightened again at the next start
    assert auth.ensure_token(state) == token and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_wrong_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every comparison goes through hmac.compare_digest over two SHA-256 digests: the same
    length whatever was presented, so neither a shared prefix nor a length shows in the time."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = auth.Keys("s3cret-token-value")
    for wrong in ("", "s", "s3cret-token-valu", "s3cret-token-valuf", "x" * 10_000, "s3cret-token-value "):
        assert not keys.check_token(wrong)
    assert keys.check_token("s3cret-token-value")
    assert calls == [(32, 32)] * 7


def test_sessions_are_signed_expire_and_end_with_a_new_token() -> None:
    now = [1_000_000.0]
    keys = auth.Keys("token-a", clock=lambda: now[0])
    s = keys.new_session()
    assert keys.valid_session(s)
    issued, nonce, mac = s.split(".")
    assert not keys.valid_session(f"{int(issued) + 1}.{nonce}.{mac}")       # tampered: a later issue time
    assert not keys.valid_session(f"{issued}.{nonce}.{'0' * len(mac)}")
    assert not keys.valid_session("") and not keys.valid_session(None) and not keys.valid_session("a.b")
    assert not auth.Keys("token-b", clock=lambda: now[0]).valid_session(s)  # another token: every session ends
    now[0] += auth.SESSION_TTL + 1
    assert not keys.valid_session(s)


def test_csrf_tokens_belong_to_one_session() -> None:
    keys = auth.Keys("token")
    a, b = keys.new_session(), keys.new_session()
    assert keys.valid_csrf(a, keys.csrf(a))
    assert not keys.valid_csrf(a, keys.csrf(b))
    assert not keys.valid_csrf(a, None) and not keys.valid_csrf(None, keys.csrf(a))
    assert keys.csrf(a) != auth.Keys("other").csrf(a)


def test_login_url_says_why_there_is_none(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="not running"):
        auth.login_url(tmp_path)
    (tmp_path / auth.URL_FILE).write_text("http://127.0.0.1:1\n")   # left by a daemon that was killed
    with pytest.raises(DaemonError, match="nothing answers"):
        auth.login_url(tmp_path)
