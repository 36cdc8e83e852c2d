"""Process helpers for the slot supervisor: ports, /proc identity, spawning and process groups.

Every app instance runs as the leader of its own session and process group (pgid == pid), so a
signal to the group reaches whatever the command forked (a shell wrapper, npm, gunicorn workers)
and the instances survive the daemon dying. A pid is only trusted together with its start time
(/proc/<pid>/stat field 22): a recycled pid never matches, so it is never signalled or adopted.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from changeover.errors import SlotStartError
from changeover.redact import redact_text

# Every instance's environment carries INSTANCE_TAG=<owner>:<slot>:<index>, owner being the state
# directory. A daemon killed between spawning a process and recording its pid can still find it.
INSTANCE_TAG = "CHANGEOVER_INSTANCE"

_PORT_REF = re.compile(r"\$\{PORT\}|\$PORT(?![A-Za-z0-9_])")

# Popen objects of children left running by Supervisor.close(). Kept referenced on purpose: a
# collected, un-waited Popen is put on subprocess's cleanup list and reaped behind our back by the
# next Popen(), which would steal the exit status from a Supervisor that adopted the process.
_DETACHED: list[subprocess.Popen[bytes]] = []


# -- ports ----------------------------------------------------------------------------------------
def free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A loopback port nobody listens on now: bind port 0, read it, release it."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port
    raise SlotStartError("could not find a free loopback port")


def port_free(port: int) -> bool:
    """Whether an app could listen on 127.0.0.1:port now (with SO_REUSEADDR, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- /proc identity -------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; the comm field may contain spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode("ascii", "replace").split()


def proc_start(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (field 22), or None if there is no such pid."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def proc_state(pid: int, start: int) -> str | None:
    """State letter of the process (R, S, Z...) if pid is still the process that started at start."""
    fields = _stat_fields(pid)
    if not fields or len(fields) <= 19 or int(fields[19]) != start:
        return None
    return fields[0]


# -- command --------------------------------------------------------------------------------------
def substitute_port(argv: Sequence[str], port: int) -> list[str]:
    return [_PORT_REF.sub(str(port), a) for a in argv]


def resolve_command(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """Absolute path of the executable command[0] names, or SlotStartError saying what is wrong."""
    if not command or not command[0]:
        raise SlotStartError("the app command is empty")
    if not cwd.exists():
        raise SlotStartError(f"release directory {cwd} does not exist")
    if not cwd.is_dir():
        raise SlotStartError(f"release path {cwd} is not a directory")
    name = command[0]
    if "/" in name:
        path = Path(name) if os.path.isabs(name) else cwd / name
        if not path.exists():
            raise SlotStartError(f"command {name!r} not found (looked for {path})")
        if path.is_dir() or not os.access(path, os.X_OK):
            raise SlotStartError(f"command {name!r} is not an executable file ({path})")
        return str(path.absolute())
    search = os.pathsep.join(os.get_exec_path(dict(env)))
    found = shutil.which(name, path=search)
    if found is None:
        raise SlotStartError(f"command {name!r} not found on PATH ({search})")
    return os.path.abspath(found)


# -- processes ------------------------------------------------------------------------------------
class Proc:
    """One instance's leader process: a child we spawned, or an adopted one we can only observe."""

    def __init__(self, pid: int, start: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.start = start
        self.popen = popen
        self.exited = False
        self.returncode: int | None = None  # None once exited: status unknown (not our child)
        self.started_at = time.monotonic()

    @property
    def pgid(self) -> int:
        return self.pid

    def poll(self) -> bool:
        """True once the leader has exited (reaping it if it is our child). Cheap: no blocking."""
        if self.exited:
            return True
        if self.popen is not None:
            rc = self.popen.poll()
            if rc is None:
                return False
            self.exited, self.returncode = True, rc
            return True
        state = proc_state(self.pid, self.start)
        if state is None:
            self.exited = True
        elif state in ("Z", "X"):
            # A zombie: reap it if it happens to be our child (daemon restarted in-process).
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass
            self.exited = True
        return self.exited

    def describe_exit(self) -> str:
        rc = self.returncode
        if not self.exited:
            return "is running"
        if rc is None:
            return "exited (status unknown: adopted process)"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            return f"was killed by signal {name}"
        return f"exited with code {rc}"

    def detach(self) -> None:
        """Stop owning the process but leave it running (see _DETACHED)."""
        if self.popen is not None and not self.exited:
            _DETACHED.append(self.popen)


def spawn(argv: Sequence[str], executable: str, cwd: Path, env: Mapping[str, str], log_path: Path) -> Proc:
    """Start argv in its own session, stdin /dev/null, stdout+stderr appended to log_path.

    The log file is handed to the child directly and closed here, so nothing depends on the
    daemon reading pipes and no descriptor leaks into the daemon or other children.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        log.write(f"[changeover {stamp}] starting: {redact_text(' '.join(argv))}\n".encode())
        popen = subprocess.Popen(
            list(argv), executable=executable, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    # An unreaped child keeps its /proc entry even if it already exited, so this is always found.
    return Proc(popen.pid, proc_start(popen.pid) or 0, popen)


def _live_members_exist(pgid: int) -> bool:
    """Whether a process that is not a zombie is in group pgid (a /proc scan, once the leader is gone).

    Zombies are ignored: they hold no port and take no signal, and orphaned ones are reaped by
    init, which some inits (containers, microVMs) do only every second or two.
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return False
    for name in names:
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def tagged_groups(owner: str, slots: Iterable[str]) -> set[int]:
    """Process groups holding a live process tagged as an instance of `owner` in one of `slots`."""
    needles = tuple(f"{INSTANCE_TAG}={owner}:{slot}:".encode() for slot in slots)
    groups: set[int] = set()
    if not needles:
        return groups
    try:
        names = os.listdir("/proc")
    except OSError:
        return groups
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue  # gone, or not ours to read
        if not any(v.startswith(needles) for v in environ.split(b"\0")):
            continue
        fields = _stat_fields(int(name))
        if fields and len(fields) > 2 and fields[0] not in ("Z", "X"):
            groups.add(int(fields[2]))
    return groups


def kill_orphans(owner: str, slots: Iterable[str], timeout: float = 3.0, keep: Iterable[int] = ()) -> list[int]:
    """SIGTERM, then SIGKILL, every process group tagged as an instance of `owner` in `slots`.

    Called for slots that hold nothing after recovery: what still runs there is an instance whose
    pid never reached the state (the daemon died right after spawning it), or its leftovers. Left
    alone, it would hold a port and database connections. Slots with adopted instances are never
    swept, so whatever those instances started themselves is left to them, and so are the groups
    in `keep` (a retired slot's processes still serving tunnels: daemon/linger.py).
    """
    slots = list(slots)
    orphans = sorted(tagged_groups(owner, slots) - {os.getpid(), os.getpgrp(), *keep})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in orphans:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while not (gone := tagged_groups(owner, slots).isdisjoint(orphans)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if gone:
            break
    return orphans


def group_alive(proc: Proc) -> bool:
    """Whether the instance's process group still has live members, without trusting a bare number.

    While the leader exists (even as a zombie) its pid cannot be recycled. Once it is gone the
    pgid stays reserved as long as any member exists; a process now *owning* that pid with another
    start time proves the number was recycled, hence our group is empty.
    """
    state = proc_state(proc.pid, proc.start)
    if state is not None and state not in ("Z", "X"):
        return True
    if state is None and proc_start(proc.pid) is not None:
        return False
    return _live_members_exist(proc.pgid)


def signal_group(proc: Proc, sig: int) -> bool:
    """Signal the instance's process group if it is still ours; False if it is gone."""
    if not group_alive(proc):
        return False
    try:
        os.killpg(proc.pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a member we may not signal (setuid helper); still there
    return True


async def terminate(proc: Proc, timeout: float, poll: float = 0.05) -> str:
    """SIGTERM the group, wait up to timeout for it to empty, then SIGKILL it; reap the leader."""
    escalated = False
    if not proc.poll() or group_alive(proc):
        signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() and not group_alive(proc):
                break
            await asyncio.sleep(poll)
        else:
            escalated = signal_group(proc, signal.SIGKILL)
    # After SIGKILL the leader dies at once; bound the wait anyway (e.g. stuck in D state).
    deadline = time.monotonic() + 5.0
    while not proc.poll() and time.monotonic() < deadline:
        await asyncio.sleep(poll)
    if proc.popen is None and proc.exited:
        # An adopted leader can still be our child when the daemon was restarted in-process
        # (tests, embedding): make sure no zombie is left behind.
        try:
            os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    outcome = proc.describe_exit()
    return f"{outcome} (after SIGKILL: did not stop within {timeout:g}s of SIGTERM)" if escalated else outcome


def kill_now(proc: Proc) -> None:
    """Synchronous last resort (cleanup on a failed start or cancellation): SIGKILL and reap."""
    signal_group(proc, signal.SIGKILL)
    if proc.popen is not None:
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    proc.poll()
