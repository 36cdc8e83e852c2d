"""A real daemon and an app that prints its secret: deploy output, history and daemon.log are
masked by value; the daemon's, the proxy's and the app's logs are private files."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.harness import Project

TOKEN = "tok_live_5a4b3c2d1e0f"
PW = "pg-Secret-991"


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path)
    old = os.umask(0o022)   # what a default login gets: files 0644 unless changeover says otherwise
    try:
        p.write(extra=f'\n[env]\nAPI_TOKEN = "{TOKEN}"\nBROKER_URL = "amqp://app:{PW}@127.0.0.1/x"\n')
        yield p
    finally:
        p.teardown()
        os.umask(old)


def test_a_secret_the_app_prints_is_masked_and_logs_are_private(project: Project) -> None:
    project.start_daemon()
    assert project.deploy("v1").returncode == 0
    # v2 prints its settings, the way apps do at start, and exits: the log tail is shown.
    bad = project.release("v2")
    (bad / "server.py").write_text(
        "import os, sys\n"
        "print('settings:', os.environ['API_TOKEN'], 'db password', os.environ['BROKER_URL'].split(':')[2]"
        ".split('@')[0], flush=True)\n"
        "print('Authorization: Bearer ' + os.environ['API_TOKEN'], file=sys.stderr, flush=True)\n"
        "sys.exit(3)\n")
    out = project.cli("deploy", "v2", "--path", str(bad), check=False)
    assert out.returncode != 0
    shown = out.stdout + out.stderr
    assert "settings:" in shown and "***" in shown, shown    # the log tail is there, masked
    assert TOKEN not in shown and PW not in shown

    history = project.cli("history", "--json").stdout
    assert "settings:" in history and TOKEN not in history and PW not in history

    state_dir = project.root / ".changeover"
    daemon_log = (state_dir / "daemon.log").read_text()
    assert "settings:" in daemon_log and TOKEN not in daemon_log and PW not in daemon_log
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        for table in ("steps", "deployments", "events"):
            rows = json.dumps(db.execute(f"SELECT * FROM {table}").fetchall())
            assert TOKEN not in rows and PW not in rows, table
    finally:
        db.close()

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(state_dir) == 0o700 and mode(state_dir / "logs") == 0o700
    assert mode(state_dir / "daemon.log") == 0o600
    assert mode(state_dir / "logs" / "proxy.log") == 0o600
    app_logs = list((state_dir / "logs").glob("*/*.log"))
    assert len(app_logs) >= 2, app_logs
    for f in app_logs:
        assert mode(f) == 0o600 and mode(f.parent) == 0o700, f
