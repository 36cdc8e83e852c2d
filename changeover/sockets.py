"""Where changeover's unix sockets live.

A unix socket's path may be at most 107 bytes (`sun_path`), and HAProxy, which binds a temporary
name first, takes 97. A project deep in a file system (a CI workspace, a monorepo) has a state
directory too long for that, so a socket whose path there would be too long goes to a short
private directory instead: `<runtime>/<key>/<name>`, where `<runtime>` is `/run/changeover` for
root, else `<tmp>/changeover-<uid>` (not `$XDG_RUNTIME_DIR`: a daemon run by systemd has none while
the user's shell has one, and both must find the same socket), and `<key>`
is derived from the state directory's real path, so the daemon, its proxy workers and the CLI all
arrive at the same file without being told. Those directories are created 0700 and used only if
they belong to this user, are real directories (not links) and nobody else can write to them:
another local user must not be able to plant a socket the CLI would talk to.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from changeover.errors import ChangeoverError

MAX_UNIX_PATH = 107       # sun_path, minus the terminating NUL
HAPROXY_MAX_UNIX_PATH = 97   # HAProxy binds `<path>.<pid>.tmp` first, then renames it
_PLAIN = re.compile(r"[A-Za-z0-9_./@+-]+")


def runtime_dir() -> Path:
    """The base of the short socket directories (and of the shared front's sockets)."""
    if os.geteuid() == 0:
        return Path("/run/changeover")
    return Path(tempfile.gettempdir()) / f"changeover-{os.getuid()}"


def own_dir(path: Path, mode: int = 0o700) -> Path:
    """`path` created (parents included) or checked: a directory of this user that no one else
    can write to. Raises ChangeoverError, naming the directory, when it is not."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise ChangeoverError(f"cannot create the socket directory {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ChangeoverError(f"the socket directory {path} is not a private directory of this user "
                              f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}): remove it, "
                              "changeover creates it again")
    return path


def short_dir(directory: Path) -> Path:
    """The short private directory standing in for `directory` (see the module docstring)."""
    key = hashlib.sha256(os.fsencode(directory.resolve())).hexdigest()[:20]
    base = runtime_dir()
    own_dir(base, 0o755 if os.geteuid() == 0 else 0o700)
    return own_dir(base / key)


def plain(path: Path) -> bool:
    """Only characters HAProxy reads the same anywhere: in its config unquoted, in `-S path,opts`."""
    return _PLAIN.fullmatch(str(path)) is not None


def place(directory: Path, name: str, limit: int = MAX_UNIX_PATH, room_for: str = "",
          only_plain: bool = False) -> Path:
    """Where the socket `name` of `directory` lives: `directory/name` if the directory's real path
    with `name` fits a unix socket (`limit` bytes), else `name` in `short_dir(directory)`.
    `room_for`: decide as if the name were that one, so that two sockets, one renamed over the
    other (a proxy handover's `proxy.next.sock`), are always in the same place. `only_plain`: a
    path with other characters than `plain()` allows (a space, a comma, a quote: a project in
    "~/My Sites/") goes to the short directory too (HAProxy's sockets)."""
    path = directory / name
    real = directory.resolve()          # decided on the real path, so every spelling agrees
    room = max(len(os.fsencode(name)), len(os.fsencode(room_for)))
    if len(os.fsencode(real)) + 1 + room <= limit and (not only_plain or plain(real / name)):
        fits = len(os.fsencode(directory)) + 1 + room <= limit and (not only_plain or plain(path))
        return path if fits else real / name
    short = short_dir(directory) / name
    if len(os.fsencode(short)) > limit:
        raise ChangeoverError(f"no short enough path for the unix socket {name}: {short} is over {limit} bytes "
                              "(set TMPDIR to a shorter directory)")
    if only_plain and not plain(short):
        raise ChangeoverError(f"no path HAProxy can read for the unix socket {name}: {short} holds characters "
                              "other than letters, digits and ._-+@/ (set TMPDIR to a directory without them)")
    return short
