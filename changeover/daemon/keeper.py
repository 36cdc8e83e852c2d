"""Keeping a slot's instances running: each has a keeper task that polls its process, and restarts
it when it crashes.

Restart policy (like Kubernetes' CrashLoopBackOff, not systemd's start limit): a crashed instance is
restarted forever, after 0.5 s doubling to 30 s; the delay resets once an instance has run for 30 s.
Giving up for good would leave the live slot short of instances until a human notices, while the
usual causes of a crash loop (a database or upstream API down) heal by themselves; the `crashed`
and `restarting` events (with the crash count) tell the daemon and the monitor what is going on.
The keeper only gives up (`gave_up`) when a restart cannot work at all: the release directory or
its command is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from changeover.daemon import procs
from changeover.daemon.instances import Instance
from changeover.daemon.logs import rotate
from changeover.daemon.spawner import Spawner, last_line, os_error
from changeover.errors import SlotStartError

log = logging.getLogger("changeover.supervisor")

POLL_INTERVAL = 0.15        # how often a keeper looks at its process
BACKOFF_START = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0         # running this long resets the backoff
LOG_CHECK_EVERY = 10.0             # seconds between log size checks


class Keeper(Spawner):
    """The supervisor's restart half: `_keep` runs as one task per instance."""


    async def _keep(self, slot: str, inst: Instance, restart_first: bool = False) -> None:
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
                           f"{inst.proc.describe_exit()}; last log line: {last_line(inst.log_path)}")
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

    async def _rotate_log(self, inst: Instance) -> None:
        try:
            await asyncio.to_thread(rotate, inst.log_path, self.log_max_bytes)
        except OSError as e:  # a full disk must not stop supervision
            log.warning("cannot rotate %s: %s", inst.log_path, e)

    async def _restart(self, slot: str, inst: Instance) -> bool:
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
                self._emit(slot, "crashed", inst, f"cannot start instance {inst.index}: {os_error(e)}")
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
