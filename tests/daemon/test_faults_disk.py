"""A full filesystem under .changeover/ in the middle of a deploy, on a real size-limited tmpfs:
the new slot is stopped, the old one stays live, the output says "disk full", and the deployment
is recorded as failed as soon as the state can be written again."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover.state import State
from changeover.state_schema import Deployment
from tests.daemon.harness import Project

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    p = Project(tmp_path)
    p.write()
    state_dir = tmp_path / ".changeover"
    state_dir.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(state_dir)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    # The start step is held 2 s after it acted: the disk fills while it runs.
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "start:2")
    try:
        yield p
    finally:
        with contextlib.suppress(OSError):
            (state_dir / "filler").unlink()
        p.teardown()
        if subprocess.run(["umount", str(state_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(state_dir)], capture_output=True)


def fill(path: Path) -> None:
    """Write until the filesystem says ENOSPC, in big then small blocks."""
    with open(path, "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 512):
            while True:
                try:
                    f.write(b"\0" * block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break


def health(p: Project) -> dict[str, object]:
    with urllib.request.urlopen(p.url("/health"), timeout=10) as r:
        return dict(json.loads(r.read()))


def pids_in(directory: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if d.name.isdigit() and os.readlink(d / "cwd") == str(directory):
                out.append(int(d.name))
    return out


def deploy_v2(p: Project) -> tuple[subprocess.Popen[str], Path]:
    v2 = p.release("v2")
    deploy = subprocess.Popen([sys.executable, "-m", "changeover", "deploy", "v2", "--path", str(v2), "-c",
                               str(p.config)], cwd=p.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    return deploy, v2


def fill_and_expect_v1(p: Project, deploy: subprocess.Popen[str], v2: Path) -> Path:
    """Fill the disk under the running deploy: it fails saying "disk full", v1 serves and v2's
    processes are gone (not left "starting" until the next deploy). Returns the filler file."""
    filler = p.root / ".changeover" / "filler"
    fill(filler)
    out, _ = deploy.communicate(timeout=120)
    assert deploy.returncode == 1, out
    assert "disk full" in out and "internal error" not in out and "OperationalError:" not in out, out
    assert "v1 is still live" in out, out
    assert health(p)["version"] == "v1"
    deadline = time.monotonic() + 30
    while pids_in(v2):
        assert time.monotonic() < deadline, f"v2 still runs: {pids_in(v2)}"
        time.sleep(0.1)
    return filler


def recorded_once_space_returns(p: Project, filler: Path) -> Deployment:
    """Space comes back: without a deploy, the deployment is recorded as failed, its slot as empty
    and not live."""
    filler.unlink()
    deadline = time.monotonic() + 30
    while True:
        st = State(p.root / ".changeover" / "state.db", readonly=True)
        try:
            dep = st.deployments(1)[0]
            live = st.live_slot()
            slot = st.slot(dep.slot or "")
        finally:
            st.close()
        if dep.state == "failed" and slot.state == "empty" and live != dep.slot:
            return dep
        assert time.monotonic() < deadline, f"deployment {dep.state}, slot {slot.state}, live {live}"
        time.sleep(0.2)


def test_disk_full_during_a_deploy_stops_the_new_slot_and_keeps_the_old_one(small_disk: Project) -> None:
    p = small_disk
    p.start_daemon()
    p.deployed("v1")
    assert health(p)["version"] == "v1"
    deploy, v2 = deploy_v2(p)
    p.wait_for_step("start")
    filler = fill_and_expect_v1(p, deploy, v2)
    dep = recorded_once_space_returns(p, filler)
    assert dep.version == "v2" and "disk full" in (dep.reason or "")
    assert p.status()["live"]["version"] == "v1"
    assert p.deploy("v3").returncode == 0   # and the next deploy works
    assert health(p)["version"] == "v3"


def test_disk_full_right_after_the_switch_switches_back_to_the_warm_old_slot(small_disk: Project,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    p = small_disk
    # the switch step is held 3 s after it acted (v2 serves), before it is recorded done
    monkeypatch.setenv("CHANGEOVER_TEST_STEP_DELAY", "switch:3")
    p.start_daemon()
    p.deployed("v1")
    deploy, v2 = deploy_v2(p)
    p.wait_for_step("switch")
    deadline = time.monotonic() + 30
    while health(p)["version"] != "v2":             # the switch acted: users are on v2
        assert time.monotonic() < deadline, "v2 never served"
        time.sleep(0.05)
    # users are back on v1 at once, v2's processes stop, and nothing waits for the disk
    filler = fill_and_expect_v1(p, deploy, v2)
    dep = recorded_once_space_returns(p, filler)
    assert dep.version == "v2" and "disk full" in (dep.reason or "")
    assert p.status()["live"]["version"] == "v1"
    assert health(p)["version"] == "v1"
