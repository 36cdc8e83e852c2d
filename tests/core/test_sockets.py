"""Unix socket paths (changeover/sockets.py): a state directory too deep for a socket's 107 bytes
(HAProxy: 97) has its sockets in a short private directory that everyone derives alike."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from changeover import sockets
from changeover.errors import ChangeoverError


@pytest.fixture(autouse=True)
def _private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # the short directories of this test in a short directory of its own, not the machine's
    top = Path(tempfile.mkdtemp(prefix="co-rt-"))
    base = top / "rt"
    monkeypatch.setattr(sockets, "runtime_dir", lambda: base)
    yield base
    for d in (base, *base.glob("*")) if base.exists() else ():
        d.chmod(0o700)
    shutil.rmtree(top, ignore_errors=True)


def test_a_short_path_stays_in_the_state_directory(tmp_path: Path) -> None:
    assert sockets.place(tmp_path, "control.sock") == tmp_path / "control.sock"


def test_a_deep_one_goes_to_the_same_short_directory_from_every_spelling(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    p = sockets.place(deep, "control.sock")
    assert len(os.fsencode(p)) <= sockets.MAX_UNIX_PATH and not p.is_relative_to(deep)
    assert oct(p.parent.stat().st_mode & 0o777) == "0o700"
    link = tmp_path / "l"
    link.symlink_to(deep)
    assert sockets.place(link, "control.sock") == p          # a symlinked cd finds the same daemon
    assert sockets.place(deep, "proxy.sock").parent == p.parent
    other = tmp_path / ("d" * 60) / ("f" * 40)
    other.mkdir()
    assert sockets.place(other, "control.sock").parent != p.parent   # another project, another key
    # HAProxy's shorter limit: a path that fits 107 bytes but not 97 moves too
    mid = tmp_path / ("m" * (100 - len(str(tmp_path)) - 1 - len("/admin.sock")))
    mid.mkdir()
    assert sockets.place(mid, "admin.sock") == mid / "admin.sock"
    assert sockets.place(mid, "admin.sock", sockets.HAPROXY_MAX_UNIX_PATH).parent.parent == sockets.runtime_dir()
    # proxy.next.sock is renamed over proxy.sock: decided together, never on two file systems
    edge = tmp_path / ("x" * (107 - len(str(tmp_path)) - 1 - len("/proxy.sock")))
    edge.mkdir()
    assert sockets.place(edge, "proxy.sock") == edge / "proxy.sock"
    nxt = sockets.place(edge, "proxy.next.sock")
    assert nxt.parent != edge
    assert sockets.place(edge, "proxy.sock", room_for="proxy.next.sock").parent == nxt.parent


def test_a_directory_others_can_write_to_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    base = sockets.runtime_dir()
    base.mkdir(mode=0o700)
    base.chmod(0o777)                  # e.g. made by someone else to plant a socket there
    with pytest.raises(ChangeoverError) as e:
        sockets.place(deep, "control.sock")
    assert str(base) in str(e.value) and "not a private directory" in str(e.value)
    base.chmod(0o700)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    key_dir = sockets.short_dir(deep)
    key_dir.rmdir()
    key_dir.symlink_to(target)         # a link is never followed
    with pytest.raises(ChangeoverError, match="not a private directory"):
        sockets.place(deep, "control.sock")


def test_haproxys_sockets_leave_a_path_with_a_space_or_a_comma(tmp_path: Path) -> None:
    spaced = tmp_path / "My Sites, 2026"
    spaced.mkdir()
    assert sockets.place(spaced, "control.sock") == spaced / "control.sock"     # ours take any path
    moved = sockets.place(spaced, "admin.sock", sockets.HAPROXY_MAX_UNIX_PATH, only_plain=True)
    assert moved.parent.parent == sockets.runtime_dir() and sockets.plain(moved)
    assert sockets.place(tmp_path, "admin.sock", sockets.HAPROXY_MAX_UNIX_PATH, only_plain=True) \
        == tmp_path / "admin.sock"
