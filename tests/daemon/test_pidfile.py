"""daemon.pid is a lock held by the running daemon, not a pid to probe with kill -0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.daemon.harness import Project


def test_a_stale_pidfile_naming_a_live_process_does_not_stop_serve(project: Project) -> None:
    # After a reboot the pid in the file may belong to any process: here, this test's own.
    state_dir = project.root / ".changeover"
    state_dir.mkdir()
    (state_dir / "daemon.pid").write_text(f"{os.getpid()}\n")
    project.start_daemon()
    assert project.daemon is not None
    assert (state_dir / "daemon.pid").read_text().strip() == str(project.daemon.pid)

    # While it runs, a second daemon for the same config is refused, naming the first.
    second = subprocess.run([sys.executable, "-m", "changeover", "serve", "-c", str(project.config)],
                            cwd=project.root, capture_output=True, text=True, timeout=60)
    assert second.returncode == 3, second.stderr
    assert f"already running for this config (pid {project.daemon.pid})" in second.stderr
    assert project.daemon.poll() is None


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_killed_daemon_not_yet_reaped_leaves_no_lock(project: Project) -> None:
    project.start_daemon()
    old = project.daemon
    assert old is not None
    old.send_signal(signal.SIGKILL)   # not waited for: a zombie, which `kill -0` still finds
    deadline = time.monotonic() + 30
    while not _zombie(old.pid):
        assert time.monotonic() < deadline, "the killed daemon did not become a zombie"
        time.sleep(0.05)
    assert (project.root / ".changeover" / "daemon.pid").read_text().strip() == str(old.pid)
    project.start_daemon()
    assert _zombie(old.pid)   # still unreaped while the new daemon took over
    old.wait()
