"""Secrets are masked by value wherever they appear; logs are private files."""

from __future__ import annotations

import grp
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover import redact
from changeover.daemon import logs as logfiles
from changeover.daemon.logs import setup_logging
from changeover.retention import LogsConfig
from changeover.state import State

TOKEN = "tok_live_9f8e7d6c5b4a"
ENV = {"API_TOKEN": TOKEN, "DATABASE_URL": "postgres://app:pg-pass-77@db/app", "STRIPE_KEY": "sk_abc123xyz",
       "DEBUG": "1", "SHORT_SECRET": "ab"}


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    redact.forget_all()
    logfiles.configure(None)
    yield
    redact.forget_all()
    logfiles.configure(None)


def test_values_of_secret_named_keys_are_masked_however_they_are_printed() -> None:
    redact.remember_env(ENV)
    text = f"config: {TOKEN}\nAuthorization: Bearer {TOKEN}\n{{\"stripe\": \"sk_abc123xyz\"}} pw pg-pass-77"
    out = redact.redact_text(text)
    assert TOKEN not in out and "sk_abc123xyz" not in out and "pg-pass-77" not in out
    assert out.count(redact.MASK) == 4
    # Short values and values of other keys are not masked by value.
    assert redact.redact_text("DEBUG=1 ab") == "DEBUG=1 ab"


def test_a_secret_containing_another_is_masked_whole() -> None:
    redact.remember(["abcd", "abcdefgh"])
    assert redact.redact_text("x abcdefgh y") == f"x {redact.MASK} y"


def test_what_the_state_stores_is_masked(tmp_path: Path) -> None:
    st = State(tmp_path / "state.db")
    rel = st.add_release("v1", str(tmp_path), ["app"], ENV)
    dep = st.begin_deployment("deploy", "v1", rel.id, None, "blue", reason=f"because {TOKEN}")
    step = st.begin_step(dep, "start blue", detail=f"starting with {TOKEN}")
    st.end_step(step, "failed", f"log tail: API_TOKEN is {TOKEN}")
    st.add_checks(dep, [{"name": "smoke", "ok": False, "detail": f"got {TOKEN}", "data": {"body": TOKEN}}])
    st.event("instance.crashed", "blue", detail=f"Bearer {TOKEN}")
    st.transition_deployment(dep, "failed", f"start blue: {TOKEN}")
    st.close()
    raw = sqlite3.connect(tmp_path / "state.db")
    dumped = "\n".join(raw.iterdump())
    raw.close()
    # Only the releases table holds it (the env the app is started with), in a 0600 file.
    assert dumped.count(TOKEN) == 1 and "INSERT INTO \"releases\"" in dumped.split(TOKEN)[0].rsplit("\n", 1)[1]
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600


def test_a_daemon_reading_its_state_masks_the_secrets_of_releases_it_did_not_write(tmp_path: Path) -> None:
    st = State(tmp_path / "state.db")
    st.add_release("v1", str(tmp_path), ["app"], ENV)
    st.close()
    redact.forget_all()   # a new daemon process
    State(tmp_path / "state.db").close()
    assert TOKEN not in redact.redact_text(f"printed {TOKEN}")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_daemon_log_is_private_masked_and_rotated(tmp_path: Path) -> None:
    state_dir = tmp_path / ".changeover"
    state_dir.mkdir(mode=0o755)
    (state_dir / "daemon.log").write_text("old\n")
    os.chmod(state_dir / "daemon.log", 0o644)   # left by an older version
    old = os.umask(0o022)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(state_dir, logs=LogsConfig(max_bytes=2000, backups=2))
        redact.remember_env(ENV)
        for i in range(200):
            logging.getLogger("changeover.test").info("line %d app said %s", i, TOKEN)
        try:
            raise RuntimeError(f"crash with {TOKEN}")
        except RuntimeError:
            logging.getLogger("changeover.test").exception("it failed")
        for h in root.handlers:
            h.flush()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        os.umask(old)
    files = sorted(state_dir.glob("daemon.log*"))
    assert [f.name for f in files] == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    assert _mode(state_dir) == 0o700
    for f in files:
        assert _mode(f) == 0o600, f
        assert f.stat().st_size <= 2000 + 200
        assert TOKEN not in f.read_text()
    assert "crash with ***" in files[0].read_text()


def test_log_files_with_a_group_are_0640_in_0750(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    logfiles.configure(group)
    d = logfiles.private_dir(tmp_path / "logs" / "blue")
    f = logfiles.private_file(d / "v1.0.log")
    assert _mode(d) == 0o750 and _mode(f) == 0o640 and f.stat().st_gid == os.getgid()


def test_a_rotated_app_log_stays_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        log = logfiles.private_file(tmp_path / "v1.0.log")
        log.write_bytes(b"x" * 100)
        assert logfiles.rotate(log, 10)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "v1.0.log.1") == 0o600


def test_events_sent_to_a_deploy_client_are_masked() -> None:
    redact.remember_env(ENV)
    event = {"type": "step", "detail": f"log: {TOKEN}", "data": [{"x": f"Bearer {TOKEN}"}]}
    assert TOKEN not in json.dumps(redact.redact_json(event))
