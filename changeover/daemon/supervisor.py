"""The slot supervisor: starts a release's instances, proves them ready, keeps them running.

A slot ("blue", "green") runs `app.instances` copies of one release, each on its own loopback
port with its own log file. Lifecycle of an instance:

    start_slot: spawn -> health 2xx `healthy_threshold` times in a row -> ready   (else SlotStartError)
    keeper:     poll the leader every 150 ms -> crashed -> backoff -> respawn -> ready -> restarted

Restarts (crash -> backoff -> respawn, forever) are keeper.py's; spawning one instance and
proving it ready is spawner.py's; this module keeps the slots: starting them whole, stopping,
handing them over, adopting them after a daemon restart.

Instances run in their own sessions and outlive the daemon; `close()` leaves them running and a
new daemon takes them over with `adopt()` from the records it persisted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from changeover.daemon import procs
from changeover.daemon.instances import Instance, InstanceRecord, ReleaseSpec, SlotProcesses
from changeover.daemon.keeper import Keeper
from changeover.daemon.logs import prune_release_logs
from changeover.daemon.spawner import os_error
from changeover.errors import SlotStartError

log = logging.getLogger("changeover.supervisor")

LOG_KEEP_RELEASES = 5              # per slot: older releases' log files are deleted when one starts


class Supervisor(Keeper):
    """A slot's instances, started together and kept as one (queries, start, stop, adopt, close)."""


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
            instances.append(Instance(index, port, self._log_path(slot, release.version, index)))
        s = SlotProcesses(release, instances)
        self._slots[slot] = s
        try:
            for inst in instances:
                try:
                    self._spawn(slot, release, inst, executable)
                except OSError as e:
                    raise SlotStartError(
                        f"slot {slot}: cannot start {release.command[0]!r} for release {release.version}: "
                        f"{os_error(e)}") from None
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

    async def _all_ready(self, slot: str, release: ReleaseSpec, instances: list[Instance],
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

    async def _first_ready(self, slot: str, release: ReleaseSpec, inst: Instance,
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
            return f"instance {inst.index} could not be started again: {os_error(e)}"
        return await self._wait_ready(inst)

    # -- stop, adopt, close -----------------------------------------------------------------------
    async def stop_slot(self, slot: str, stop_timeout: float | None = None) -> None:
        """SIGTERM every instance's process group, SIGKILL what is left after stop_timeout."""
        s = self._slots.get(slot)
        if s is None:
            return
        timeout = self.app.stop_timeout if stop_timeout is None else stop_timeout
        await self._cancel_keepers(s)

        async def stop(inst: Instance) -> None:
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
        alive: list[Instance] = []
        lost: list[Instance] = []
        for rec in records:
            proc = procs.Proc(rec.pid, rec.proc_start)
            inst = Instance(rec.index, rec.port, Path(rec.log_path), proc=proc)
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
                lost.append(Instance(index, port, self._log_path(slot, release.version, index)))
        self._slots[slot] = SlotProcesses(release, sorted(alive + lost, key=lambda i: i.index))
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

    async def _cancel_keepers(self, s: SlotProcesses) -> None:
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
