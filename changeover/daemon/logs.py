"""Log files: who may read them, rotation, and reading app instance logs (tail, `logs -f`).

Every log the daemon makes (daemon.log, proxy.log, the app's instance logs) may hold what an app
prints, secrets included, so it is created 0600 in a 0700 directory; with `[logs] group` it is
0640/0750 and owned by that group (a log shipper's). Existing files and directories are brought to
that mode, so a host upgraded from a version that made them 0644/0755 is closed too.

Instances write straight into their log files (the supervisor never pipes them), so readers work
on the files alone: they may not exist yet, may be truncated or replaced (rotation) at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import io
import logging.handlers
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from changeover.redact import RedactingFormatter
from changeover.retention import DEFAULT_LOG_BACKUPS, DEFAULT_LOG_MAX_BYTES, LogsConfig

_BLOCK = 8192
OWN_LOG_CHECK_EVERY = 30.0   # bound_own_log: how often a process looks at its log's size
_MAX_LINE = 64 * 1024  # a partial line longer than this is emitted as is, so memory stays bounded
_RELEASE_LOG = re.compile(r"^(?P<release>.+)\.\d+\.log(?:\.\d+)?$")  # <release>.<n>.log[.k]


_group: int | None = None   # gid of [logs] group, set once by the daemon (configure)


def configure(group: str | None) -> None:
    """Set the group that may read the logs (None: only the daemon's user)."""
    global _group
    _group = grp.getgrnam(group).gr_gid if group else None


def file_mode() -> int:
    return 0o640 if _group is not None else 0o600


def dir_mode() -> int:
    return 0o750 if _group is not None else 0o700


def _own(fd_or_path: int | Path, mode: int) -> None:
    if isinstance(fd_or_path, int):
        if _group is not None:
            os.fchown(fd_or_path, -1, _group)
        os.fchmod(fd_or_path, mode)
        return
    with contextlib.suppress(PermissionError):   # a directory of another user: leave it as it is
        if _group is not None:
            os.chown(fd_or_path, -1, _group)
        os.chmod(fd_or_path, mode)


def private_dir(path: Path) -> Path:
    """Create path (and parents) if needed; path itself gets the log directory mode."""
    path.mkdir(parents=True, exist_ok=True, mode=dir_mode())
    _own(path, dir_mode())
    return path


def private_file(path: Path) -> Path:
    """Create path if needed (never truncating it) with the log file mode, and fix an existing one's."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, file_mode())
    try:
        _own(fd, file_mode())
    finally:
        os.close(fd)
    return path


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """daemon.log: rotated past max_bytes (0: never), and every file it opens is private."""

    def _open(self) -> io.TextIOWrapper:
        private_file(Path(self.baseFilename))
        return super()._open()


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")


def tail_lines(path: Path, n: int) -> list[str]:
    """The last n lines of path (without newlines), reading backwards from the end. [] if missing."""
    if n <= 0:
        return []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below; open errors mean "no lines"
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        # n lines need n newlines before them, plus possibly a trailing one.
        while pos > 0 and data.count(b"\n") <= n:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [_decode(x) for x in lines[-n:]]


def rotate(path: Path, max_bytes: int, keep: int = 1) -> bool:
    """Copy-truncate path to path.1 (older ones shift to .2 ... .keep) once it exceeds max_bytes.

    The running app keeps its descriptor (opened O_APPEND), so the file cannot be renamed under
    it: copy then truncate, as logrotate's copytruncate does. Lines written between the two steps
    are lost; that window is a few milliseconds once per max_bytes.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    for i in range(keep - 1, 0, -1):
        older = Path(f"{path}.{i}")
        if older.exists():
            os.replace(older, f"{path}.{i + 1}")
    tmp = private_file(Path(f"{path}.1.tmp"))
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, f"{path}.1")
    os.truncate(path, 0)
    return True


async def bound_own_log(max_bytes: int = DEFAULT_LOG_MAX_BYTES, keep: int = DEFAULT_LOG_BACKUPS,
                        every: float = OWN_LOG_CHECK_EVERY) -> None:
    """For a long-lived process whose stderr is its log file (the proxy worker's proxy.log, the
    shared front's log): rotate that file past max_bytes, as `rotate` does for app logs. Several
    processes may write one file (a worker group, a handover): an flock makes one rotate at a time."""
    try:
        path = Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        return
    if not path.is_absolute() or not path.is_file() or max_bytes <= 0:
        return                          # a terminal, a pipe: nothing of ours to bound

    def once() -> None:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return                  # another writer of this file is rotating it
            rotate(path, max_bytes, keep)

    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(once)
        except OSError as e:            # a full disk must not stop the process
            logging.getLogger("changeover").warning("cannot rotate %s: %s", path, e)


def prune_release_logs(directory: Path, keep: int, current: str) -> list[Path]:
    """Delete the log files of all but the `keep` most recent releases in a slot's log directory.

    `current` (the release about to start) always counts as one of them. A release's files are
    `<release>.<n>.log` and their rotated copies; its age is that of its newest file.
    """
    newest: dict[str, float] = {}
    files: dict[str, list[Path]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for path in entries:
        m = _RELEASE_LOG.match(path.name)
        if m is None or not path.is_file():
            continue
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        release = m["release"]
        files.setdefault(release, []).append(path)
        newest[release] = max(newest.get(release, 0.0), mtime)
    others = sorted((r for r in newest if r != current), key=lambda r: newest[r], reverse=True)
    removed = []
    for release in others[max(keep - 1, 0):]:
        for path in files[release]:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


@dataclass
class _Followed:
    path: Path
    file: BinaryIO | None = None
    ino: int = 0
    offset: int = 0
    partial: bytes = b""
    lines: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _read_available(self) -> None:
        assert self.file is not None
        while chunk := self.file.read(_BLOCK):
            self.offset += len(chunk)
            parts = (self.partial + chunk).split(b"\n")
            self.partial = parts.pop()
            self.lines.extend(_decode(p) for p in parts)
            if len(self.partial) > _MAX_LINE:
                self.lines.append(_decode(self.partial))
                self.partial = b""

    def _open(self, at_end: bool) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open while following, closed by close()
        except OSError:
            return
        st = os.fstat(f.fileno())
        self.file, self.ino = f, st.st_ino
        self.offset = f.seek(0, os.SEEK_END) if at_end else 0
        self.partial = b""

    def poll(self, first: bool = False) -> list[str]:
        """New complete lines since the last poll, following truncation and replacement."""
        if self.file is None:
            self._open(at_end=first)
        if self.file is not None:
            self._read_available()
            try:
                st = os.stat(self.path)
            except OSError:
                st = None
            if st is not None and (st.st_ino != self.ino or st.st_size < self.offset):
                # Rotated (a new file at the path) or truncated: the old one is fully read above.
                if self.partial:
                    self.lines.append(_decode(self.partial))
                self.close()
                self._open(at_end=False)
                if self.file is not None:
                    self._read_available()
        out, self.lines = self.lines, []
        return out


async def follow(paths: Sequence[Path], n: int = 10, interval: float = 0.25
                 ) -> AsyncIterator[tuple[Path, str]]:
    """Yield (path, line): the last n lines of each file, then lines as they are appended, forever.

    Files that do not exist yet are picked up (from their start) when they appear; a truncated or
    rotated file is re-read from the start of the new content.
    """
    followed = [_Followed(Path(p)) for p in paths]
    try:
        for fl in followed:
            fl.poll(first=True)  # open at the end first, so nothing appended after the tail is lost
            for line in tail_lines(fl.path, n):
                yield fl.path, line
        while True:
            await asyncio.sleep(interval)
            for fl in followed:
                for line in fl.poll():
                    yield fl.path, line
    finally:
        for fl in followed:
            fl.close()


def setup_logging(state_dir: Path, verbose: bool = False, logs: LogsConfig | None = None) -> None:
    """daemon.log (private, rotated per [logs]) and stderr, both masked (changeover.redact)."""
    logs = logs or LogsConfig()
    configure(logs.group)
    private_dir(state_dir)
    fmt = RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fh = PrivateRotatingFileHandler(state_dir / "daemon.log", maxBytes=logs.max_bytes, backupCount=logs.backups)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(sh)
    logging.getLogger("httpx").setLevel(logging.WARNING)
