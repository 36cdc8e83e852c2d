"""The slot supervisor: starts a release's instances, proves them ready, keeps them running.

A slot ("blue", "green") runs `app.instances` copies of one release, each on its own loopback
port with its own log file. Lifecycle of an instance:

    start_slot: spawn -> health 2xx `healthy_threshold` times in a row -> ready   (else SlotStartError)
    keeper:     poll the leader every 150 ms -> crashed -> backoff -> respawn -> ready -> restarted

Restart policy (like Kubernetes' CrashLoopBackOff, not systemd's start limit): a crashed instance is
restarted forever, after 0.5 s doubling to 30 s; the delay resets once an instance has run for 30 s.
Giving up for good would leave the live slot short of instances until a human notices, while the
usual causes of a crash loop (a database or upstream API down) heal by themselves; the `crashed`
and `restarting` events (with the crash count) tell the daemon and the monitor what is going on.
The supervisor only gives up (`gave_up`) when a restart cannot work at all: the release directory
or its command is gone.

Instances run in their own sessions and outlive the daemon; `close()` leaves them running and a
new daemon takes them over with `adopt()` from the records it persisted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changeover.config import AppConfig, process_env
from changeover.daemon import procs
from changeover.daemon.logs import private_dir, private_file, prune_release_logs, rotate, tail_lines
from changeover.daemon.readiness import wait_ready
from changeover.errors import SlotStartError
from changeover.redact import redact_text

log = logging.getLogger("changeover.supervisor")

POLL_INTERVAL = 0.15        # how often a keeper looks at its process
BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0         # running this long resets the backoff
LOG_TAIL = 20               # log lines quoted in a SlotStartError
LOG_MAX_BYTES = 50 * 1024 * 1024   # an instance log is rotated (copy-truncate, one old file) past this
LOG_CHECK_EVERY = 10.0             # seconds between log size checks
LOG_KEEP_RELEASES = 5              # per slot: older releases' log files are deleted when one starts
_SLOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ReleaseSpec:
    """What a slot runs."""

    version: str
    path: Path                     # working directory of the app
    command: tuple[str, ...]       # argv, never a shell; "$PORT" and "${PORT}" substituted per instance
    env: dict[str, str]            # the release env, over the daemon's own; PORT is added per instance


@dataclass(frozen=True)
class InstanceRecord:
    """One running instance, persisted by the daemon so a restarted daemon can adopt it."""

    index: int
    pid: int
    port: int
    proc_start: int                # /proc/<pid>/stat field 22: a recycled pid never matches
    log_path: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "port": self.port,
                "proc_start": self.proc_start, "log_path": self.log_path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        try:
            rec = cls(index=int(data["index"]), pid=int(data["pid"]), port=int(data["port"]),
                      proc_start=int(data["proc_start"]), log_path=str(data["log_path"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid instance record {data!r}: {e}") from None
        if rec.pid <= 1 or not 0 < rec.port < 65536 or rec.index < 0:
            raise ValueError(f"invalid instance record {data!r}")
        return rec


@dataclass(frozen=True)
class SupervisorEvent:
    slot: str
    kind: str  # started | ready | crashed | restarting | restarted | gave_up | stopped | adopted | lost
    instance: InstanceRecord | None
    detail: str


@dataclass(eq=False)
class _Instance:
    index: int
    port: int
    log_path: Path
    proc: procs.Proc | None = None
    ready: bool = False
    gave_up: bool = False
    crashes: int = 0             # consecutive, reset after STABLE_AFTER of running
    total_crashes: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def record(self) -> InstanceRecord | None:
        if self.proc is None or self.proc.exited:
            return None
        return InstanceRecord(self.index, self.proc.pid, self.port, self.proc.start, str(self.log_path))


@dataclass
class _SlotProcesses:
    release: ReleaseSpec
    instances: list[_Instance]


class Supervisor:
    def __init__(self, app: AppConfig, logs_dir: Path,
                 on_event: Callable[[SupervisorEvent], None] | None = None) -> None:
        self.app = app
        self.logs_dir = Path(logs_dir)
        # Tags this supervisor's instances (see procs.INSTANCE_TAG): the state directory.
        self.owner = str(self.logs_dir.resolve().parent)
        self.on_event = on_event
        self._slots: dict[str, _SlotProcesses] = {}
        self._ports: set[int] = set()    # reserved by any instance, also while it restarts
        self._closed = False
        self.log_max_bytes = LOG_MAX_BYTES

    # -- queries ----------------------------------------------------------------------------------
    def upstreams(self, slot: str) -> list[tuple[str, int]]:
        """Addresses of the slot's instances that are running and ready (not restarting)."""
        s = self._slots.get(slot)
        return [("127.0.0.1", i.port) for i in s.instances
                if i.ready and i.proc is not None and not i.proc.exited] if s else []

    def records(self, slot: str) -> list[InstanceRecord]:
        """Every live instance process of the slot (ready or not): what the daemon persists."""
        s = self._slots.get(slot)
        return [r for i in s.instances if (r := i.record()) is not None] if s else []

    def release(self, slot: str) -> ReleaseSpec | None:
        s = self._slots.get(slot)
        return s.release if s else None

    def log_paths(self, slot: str) -> list[Path]:
        s = self._slots.get(slot)
        return [i.log_path for i in s.instances] if s else []

    # -- start ------------------------------------------------------------------------------------
    async def start_slot(self, slot: str, release: ReleaseSpec) -> list[InstanceRecord]:
        """Start the release in the slot and return once every instance is ready.

        Raises SlotStartError (after killing everything it started) when an instance exits or is
        not ready within app.ready_timeout; the message has the last health error and log tail.
        """
        self._check_slot(slot)
        if slot in self._slots:
            cur = self._slots[slot].release.version
            raise SlotStartError(f"slot {slot} is already running release {cur}; stop it first")
        executable = self._precheck(release)
        prune_release_logs(self.logs_dir / slot, LOG_KEEP_RELEASES, self._log_name(release.version))
        instances = []
        for index in range(self.app.instances):
            port = procs.free_port(self._ports)
            self._ports.add(port)
            instances.append(_Instance(index, port, self._log_path(slot, release.version, index)))
        s = _SlotProcesses(release, instances)
        self._slots[slot] = s
        try:
            for inst in instances:
                try:
                    self._spawn(slot, release, inst, executable)
                except OSError as e:
                    raise SlotStartError(
                        f"slot {slot}: cannot start {release.command[0]!r} for release {release.version}: "
                        f"{_os_error(e)}") from None
            await self._all_ready(slot, release, instances, executable)
        except BaseException:
            # Failure or cancellation: nothing may stay behind.
            for inst in instances:
                if inst.proc is not None:
                    procs.kill_now(inst.proc)
            self._forget(slot)
            raise
        for inst in instances:
            inst.ready = True
            self._emit(slot, "ready", inst, f"ready on port {inst.port}")
            inst.task = asyncio.get_running_loop().create_task(
                self._keep(slot, inst), name=f"keeper-{slot}-{inst.index}")
        return self.records(slot)

    async def _all_ready(self, slot: str, release: ReleaseSpec, instances: list[_Instance],
                         executable: str) -> None:
        """Wait for every instance concurrently; the first failure fails the slot at once."""
        waits = {asyncio.ensure_future(self._first_ready(slot, release, i, executable)): i
                 for i in instances}
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [(waits[t], err) for t in done if (err := t.result()) is not None]
                if failed:
                    inst, err = min(failed, key=lambda f: f[0].index)
                    raise SlotStartError(self._start_failure(slot, release, inst, err))
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _first_ready(self, slot: str, release: ReleaseSpec, inst: _Instance,
                           executable: str) -> str | None:
        err = await self._wait_ready(inst)
        proc = inst.proc
        if err is None or proc is None or not proc.exited or procs.group_alive(proc) \
                or procs.port_free(inst.port):
            return err
        # The app exited and its port is held by someone else: the port was taken between our
        # probe and the app's bind (an outgoing connection got it, say). Once more, elsewhere.
        self._ports.discard(inst.port)
        inst.port = procs.free_port(self._ports)
        self._ports.add(inst.port)
        try:
            self._spawn(slot, release, inst, executable)
        except OSError as e:
            return f"instance {inst.index} could not be started again: {_os_error(e)}"
        return await self._wait_ready(inst)

    def _check_slot(self, slot: str) -> None:
        if not _SLOT_NAME.fullmatch(slot):
            raise SlotStartError(f"invalid slot name {slot!r}: letters, digits, '-' and '_' only")
        if self._closed:
            raise SlotStartError("the supervisor is closed")

    def _precheck(self, release: ReleaseSpec) -> str:
        if not release.command:
            raise SlotStartError(f"release {release.version}: the app command is empty")
        for arg in release.command:
            if not isinstance(arg, str) or "\0" in arg:
                raise SlotStartError(f"release {release.version}: invalid command argument {arg!r}")
        for k, v in release.env.items():
            if not isinstance(k, str) or not k or "=" in k or "\0" in k:
                raise SlotStartError(f"release {release.version}: invalid environment variable name {k!r}")
            if not isinstance(v, str) or "\0" in v:
                raise SlotStartError(f"release {release.version}: environment variable {k} must be a "
                                     f"string without NUL bytes, got {v!r}")
        try:
            return procs.resolve_command(release.command, Path(release.path), self._env(release, 0))
        except SlotStartError as e:
            raise SlotStartError(f"release {release.version}: {e}") from None

    def _env(self, release: ReleaseSpec, port: int, slot: str = "", index: int = 0) -> dict[str, str]:
        # The daemon's environment (PATH, HOME, LANG...) under the release's own: what a user who
        # starts the app from a shell expects. PORT and the instance tag always win.
        return {**process_env(release.env), "PORT": str(port), procs.INSTANCE_TAG: f"{self.owner}:{slot}:{index}"}

    @staticmethod
    def _log_name(version: str) -> str:
        return _UNSAFE.sub("_", version).lstrip(".") or "release"

    def _log_path(self, slot: str, version: str, index: int) -> Path:
        return self.logs_dir / slot / f"{self._log_name(version)}.{index}.log"

    def _spawn(self, slot: str, release: ReleaseSpec, inst: _Instance, executable: str) -> None:
        argv = procs.substitute_port(release.command, inst.port)
        private_dir(self.logs_dir)   # the app's logs may hold what it prints: 0600 in 0700 (daemon/logs.py)
        private_file(private_dir(inst.log_path.parent) / inst.log_path.name)
        inst.proc = procs.spawn(argv, executable, Path(release.path), self._env(release, inst.port, slot, inst.index),
                                inst.log_path)
        self._emit(slot, "started", inst, f"pid {inst.proc.pid} on port {inst.port}")

    async def _wait_ready(self, inst: _Instance) -> str | None:
        assert inst.proc is not None
        return await wait_ready(inst.proc, inst.port, inst.index, self.app)

    def _start_failure(self, slot: str, release: ReleaseSpec, inst: _Instance, err: str) -> str:
        # The app's own output may print connection URLs: mask passwords before it reaches a screen.
        lines = [redact_text(line) for line in tail_lines(inst.log_path, LOG_TAIL)]
        tail = "\n".join(f"  | {line}" for line in lines) if lines else "  (empty)"
        return (f"slot {slot}: release {release.version} did not become ready: {err}\n"
                f"last {len(lines)} log lines of {inst.log_path}:\n{tail}")

    # -- keeping instances running ----------------------------------------------------------------
    async def _keep(self, slot: str, inst: _Instance, restart_first: bool = False) -> None:
        try:
            if restart_first:
                if inst.proc is not None:
                    await procs.terminate(inst.proc, min(self.app.stop_timeout, 5.0))  # stragglers
                if not await self._restart(slot, inst):
                    return
            while True:
                assert inst.proc is not None
                next_log_check = time.monotonic() + LOG_CHECK_EVERY
                while not inst.proc.poll():
                    now = time.monotonic()
                    if inst.crashes and now - inst.proc.started_at >= STABLE_AFTER:
                        inst.crashes = 0
                    if now >= next_log_check:
                        next_log_check = now + LOG_CHECK_EVERY
                        await self._rotate_log(inst)
                    await asyncio.sleep(POLL_INTERVAL)
                inst.ready = False
                inst.crashes += 1
                inst.total_crashes += 1
                self._emit(slot, "crashed", inst, f"instance {inst.index} (pid {inst.proc.pid}) "
                           f"{inst.proc.describe_exit()}; last log line: {_last_line(inst.log_path)}")
                # Whatever the leader left in its group (workers) would hold the port: end it.
                await procs.terminate(inst.proc, min(self.app.stop_timeout, 5.0))
                if not await self._restart(slot, inst):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not silently stop supervision
            log.exception("supervisor keeper for %s/%d failed", slot, inst.index)
            inst.gave_up = True
            self._emit(slot, "gave_up", inst, "internal error in the supervisor (see the daemon log)")

    async def _rotate_log(self, inst: _Instance) -> None:
        try:
            await asyncio.to_thread(rotate, inst.log_path, self.log_max_bytes)
        except OSError as e:  # a full disk must not stop supervision
            log.warning("cannot rotate %s: %s", inst.log_path, e)

    async def _restart(self, slot: str, inst: _Instance) -> bool:
        """Respawn until ready; False if restarting cannot work (gave up)."""
        s = self._slots[slot]
        while True:
            delay = min(BACKOFF_START * 2 ** (max(inst.crashes, 1) - 1), BACKOFF_CAP)
            why = (f"crash {inst.crashes} in a row ({inst.total_crashes} in total)" if inst.crashes
                   else "not running after a daemon restart")
            self._emit(slot, "restarting", inst, f"instance {inst.index}: {why}; restarting in {delay:g}s")
            await asyncio.sleep(delay)
            try:
                executable = self._precheck(s.release)
            except SlotStartError as e:
                inst.gave_up = True
                self._emit(slot, "gave_up", inst, f"cannot restart instance {inst.index}: {e}")
                return False
            if not procs.port_free(inst.port):
                self._ports.discard(inst.port)
                inst.port = procs.free_port(self._ports)
                self._ports.add(inst.port)
            try:
                self._spawn(slot, s.release, inst, executable)
            except OSError as e:
                inst.crashes += 1
                inst.total_crashes += 1
                self._emit(slot, "crashed", inst, f"cannot start instance {inst.index}: {_os_error(e)}")
                continue
            err = await self._wait_ready(inst)
            if err is None:
                inst.ready = True
                self._emit(slot, "restarted", inst, f"ready again on port {inst.port}")
                return True
            inst.crashes += 1
            inst.total_crashes += 1
            assert inst.proc is not None
            self._emit(slot, "crashed", inst, f"not ready after restart: {err}")
            await procs.terminate(inst.proc, min(self.app.stop_timeout, 5.0))

    # -- stop, adopt, close -----------------------------------------------------------------------
    async def stop_slot(self, slot: str, stop_timeout: float | None = None) -> None:
        """SIGTERM every instance's process group, SIGKILL what is left after stop_timeout."""
        s = self._slots.get(slot)
        if s is None:
            return
        timeout = self.app.stop_timeout if stop_timeout is None else stop_timeout
        await self._cancel_keepers(s)

        async def stop(inst: _Instance) -> None:
            if inst.proc is None:
                return
            rec = InstanceRecord(inst.index, inst.proc.pid, inst.port, inst.proc.start, str(inst.log_path))
            inst.ready = False
            outcome = await procs.terminate(inst.proc, timeout)
            self._emit_record(slot, "stopped", rec, f"instance {inst.index} {outcome}")

        try:
            await asyncio.gather(*(stop(i) for i in s.instances))
        finally:
            self._forget(slot)

    async def release_slot(self, slot: str) -> tuple[list[InstanceRecord], list[procs.Proc]]:
        """Stop supervising the slot's instances and forget the slot, leaving them running: they
        still serve tunnels the proxy closes at the drain limit (daemon/linger.py stops them).
        Returns their records and processes."""
        s = self._slots.get(slot)
        if s is None:
            return [], []
        records = self.records(slot)
        await self._cancel_keepers(s)
        running = [i.proc for i in s.instances if i.proc is not None and not i.proc.exited]
        self._forget(slot)
        return records, running

    def adopt(self, slot: str, release: ReleaseSpec,
              records: Sequence[InstanceRecord]) -> list[InstanceRecord]:
        """Take over a slot's instances after a daemon restart; return the ones still alive.

        An instance is alive only if its pid exists with the recorded start time (a recycled pid is
        someone else's process). Alive ones are watched (and restarted when they crash); dead ones
        are reported `lost` and, if any instance of the slot is alive, restarted. Must be called
        from the daemon's event loop.
        """
        self._check_slot(slot)
        if slot in self._slots:
            cur = self._slots[slot].release.version
            raise SlotStartError(f"slot {slot} is already supervised (release {cur})")
        loop = asyncio.get_running_loop()
        alive: list[_Instance] = []
        lost: list[_Instance] = []
        for rec in records:
            proc = procs.Proc(rec.pid, rec.proc_start)
            inst = _Instance(rec.index, rec.port, Path(rec.log_path), proc=proc)
            if proc.poll():
                self._emit_record(slot, "lost", rec,
                                  f"instance {rec.index} (pid {rec.pid}) is no longer running")
                inst.crashes = inst.total_crashes = 1
                lost.append(inst)
            else:
                inst.ready = True
                alive.append(inst)
                self._emit(slot, "adopted", inst, f"pid {rec.pid} on port {rec.port}")
        if not alive:
            return []  # nothing left of the slot: the daemon decides whether to start it again
        # A slot that still serves is kept whole: instances that died meanwhile, or were never
        # recorded (the daemon died while one restarted), are started like crashed ones are.
        self._ports |= {i.port for i in alive + lost}
        indices = {i.index for i in alive + lost}
        for index in range(self.app.instances):
            if index not in indices:
                port = procs.free_port(self._ports)
                self._ports.add(port)
                lost.append(_Instance(index, port, self._log_path(slot, release.version, index)))
        self._slots[slot] = _SlotProcesses(release, sorted(alive + lost, key=lambda i: i.index))
        for inst in alive + lost:
            inst.task = loop.create_task(self._keep(slot, inst, restart_first=inst in lost),
                                         name=f"keeper-{slot}-{inst.index}")
        return self.records(slot)

    async def close(self) -> None:
        """Stop watching; app processes keep running for the next daemon to adopt."""
        self._closed = True
        for s in list(self._slots.values()):
            await self._cancel_keepers(s)
            for inst in s.instances:
                if inst.proc is not None:
                    inst.proc.detach()
        self._slots.clear()
        self._ports.clear()

    async def _cancel_keepers(self, s: _SlotProcesses) -> None:
        tasks = [i.task for i in s.instances if i.task is not None and not i.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for i in s.instances:
            i.task = None

    def _forget(self, slot: str) -> None:
        s = self._slots.pop(slot, None)
        if s is not None:
            for i in s.instances:
                self._ports.discard(i.port)

    # -- events -----------------------------------------------------------------------------------
    def _emit(self, slot: str, kind: str, inst: _Instance, detail: str) -> None:
        rec = None
        if inst.proc is not None:
            rec = InstanceRecord(inst.index, inst.proc.pid, inst.port, inst.proc.start, str(inst.log_path))
        self._emit_record(slot, kind, rec, detail)

    def _emit_record(self, slot: str, kind: str, rec: InstanceRecord | None, detail: str) -> None:
        log.info("slot %s: %s: %s", slot, kind, detail)
        if self.on_event is None:
            return
        try:
            self.on_event(SupervisorEvent(slot, kind, rec, detail))
        except Exception:  # the daemon's handler must not break supervision
            log.exception("on_event handler failed for %s %s", slot, kind)


def _os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)


def _last_line(path: Path) -> str:
    lines = tail_lines(path, 1)
    return redact_text(lines[0][:300]) if lines else "(log empty)"
