"""Starting one instance of a release: the checks of its command and env before anything runs, its
environment and log file, the spawn itself, waiting for it to be ready, and the message when it is
not. The base of the supervisor (keeper.py restarts instances, supervisor.py keeps the slots); its
events go to the daemon's `on_event`."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from changeover.config import AppConfig, process_env
from changeover.daemon import procs
from changeover.daemon.instances import Instance, InstanceRecord, ReleaseSpec, SlotProcesses, SupervisorEvent
from changeover.daemon.logs import private_dir, private_file, tail_lines
from changeover.daemon.readiness import wait_ready
from changeover.errors import SlotStartError
from changeover.redact import redact_text

log = logging.getLogger("changeover.supervisor")

LOG_TAIL = 20               # log lines quoted in a SlotStartError
LOG_MAX_BYTES = 50 * 1024 * 1024   # an instance log is rotated (copy-truncate, one old file) past this
_SLOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Spawner:
    """The supervisor's state (slots, reserved ports) and how it starts one instance and reports it."""

    def __init__(self, app: AppConfig, logs_dir: Path,
                 on_event: Callable[[SupervisorEvent], None] | None = None) -> None:
        self.app = app
        self.logs_dir = Path(logs_dir)
        # Tags this supervisor's instances (see procs.INSTANCE_TAG): the state directory.
        self.owner = str(self.logs_dir.resolve().parent)
        self.on_event = on_event
        self._slots: dict[str, SlotProcesses] = {}
        self._ports: set[int] = set()    # reserved by any instance, also while it restarts
        self._closed = False
        self.log_max_bytes = LOG_MAX_BYTES

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

    def _spawn(self, slot: str, release: ReleaseSpec, inst: Instance, executable: str) -> None:
        argv = procs.substitute_port(release.command, inst.port)
        private_dir(self.logs_dir)   # the app's logs may hold what it prints: 0600 in 0700 (daemon/logs.py)
        private_file(private_dir(inst.log_path.parent) / inst.log_path.name)
        inst.proc = procs.spawn(argv, executable, Path(release.path), self._env(release, inst.port, slot, inst.index),
                                inst.log_path)
        self._emit(slot, "started", inst, f"pid {inst.proc.pid} on port {inst.port}")

    async def _wait_ready(self, inst: Instance) -> str | None:
        assert inst.proc is not None
        return await wait_ready(inst.proc, inst.port, inst.index, self.app)

    def _start_failure(self, slot: str, release: ReleaseSpec, inst: Instance, err: str) -> str:
        # The app's own output may print connection URLs: mask passwords before it reaches a screen.
        lines = [redact_text(line) for line in tail_lines(inst.log_path, LOG_TAIL)]
        tail = "\n".join(f"  | {line}" for line in lines) if lines else "  (empty)"
        return (f"slot {slot}: release {release.version} did not become ready: {err}\n"
                f"last {len(lines)} log lines of {inst.log_path}:\n{tail}")

    # -- events -----------------------------------------------------------------------------------
    def _emit(self, slot: str, kind: str, inst: Instance, detail: str) -> None:
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


def os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)


def last_line(path: Path) -> str:
    lines = tail_lines(path, 1)
    return redact_text(lines[0][:300]) if lines else "(log empty)"
