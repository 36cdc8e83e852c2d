"""HAProxy's per-request log, read into the daemon's `Recorder`.

HAProxy writes one short line per request (`haproxy.parse_log` knows the format) into a ring in
its memory (`ring changeover_log`). The engine follows that ring on the stats socket with
`show events changeover_log -w`, one connection per HAProxy worker, and counts each line as it
arrives. Why a ring read on the CLI, and not a log socket of ours:

- a unix datagram socket queues 10 lines by default (net.unix.max_dgram_qlen): under 50 clients
  HAProxy dropped half of them;
- a ring forwarded to a socket the daemon listens on spins HAProxy's worker at ~35 % of a core
  while nobody listens (a daemon restarting or stopped): it reconnects without a pause;
- read on the CLI, the ring costs HAProxy a memory write per request and nothing while nobody
  reads, and a new reader says where to start: `-n` (only lines from now on) after a daemon
  restart, so a line the previous daemon counted is never counted again; the whole ring for a
  worker this engine just started (by a start or a reload), so its first lines are not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from changeover.monitor.metrics import Recorder
from changeover.proxy import haproxy as hx
from changeover.proxy import haproxy_cli as hcli

log = logging.getLogger("changeover.proxy.haproxy")
RETRY = 0.5                 # pause after a failed connect, before `keep()` tries again


class LogFollower:
    def __init__(self, admin: Path, recorder: Recorder) -> None:
        self.admin = admin
        self.recorder = recorder
        self.lines = 0                          # lines counted, for the cross-check with `show stat`
        self.restarts = 0                       # readers replaced by keep(): each may have missed lines
        self._current: asyncio.Task[None] | None = None
        self._previous: set[asyncio.Task[None]] = set()
        self._followed: set[int] = set()        # worker pids with a reader: one each, never two

    async def follow(self, fresh: bool) -> None:
        """Read the ring of the worker now serving the stats socket; returns once the reader is
        in place (every request from then on is counted). The reader of the previous worker
        goes on until that worker exits (after a reload it still finishes requests)."""
        ready = self._start(fresh)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.shield(ready)

    def keep(self) -> None:
        """Replace a reader that ended (HAProxy restarted behind our back, a broken connection);
        cheap, called at every metrics pull."""
        if self._current is None or self._current.done():
            self.restarts += 1
            self._start(fresh=False)

    def _start(self, fresh: bool) -> asyncio.Future[None]:
        old = self._current
        if old is not None and not old.done():
            self._previous.add(old)
            old.add_done_callback(self._previous.discard)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._current = loop.create_task(self._run(fresh, ready), name="haproxy-log")

        def unblock(_: object) -> None:
            if not ready.done():
                ready.set_result(None)
        self._current.add_done_callback(unblock)
        return ready

    async def close(self) -> None:
        tasks = [t for t in (self._current, *self._previous) if t is not None]
        self._current = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _run(self, fresh: bool, ready: asyncio.Future[None]) -> None:
        started = time.monotonic()
        pid = mine = 0
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.admin), limit=1 << 20)
        except OSError:
            await asyncio.sleep(RETRY)
            return
        try:
            # the write side stays open: shutting it would end the session
            writer.write(f"show info;show events {hx.RING} -w{'' if fresh else ' -n'}\n".encode())
            while (line := await reader.readline()) not in (b"\n", b""):     # show info, up to its blank line
                if line.startswith(b"Pid:"):
                    pid = int(line.split(b":", 1)[1])
            if not pid or pid in self._followed:
                return
            self._followed.add(pid)
            mine = pid
            ready.set_result(None)
            rest = b""
            while chunk := await reader.read(1 << 16):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                if len(rest) > 4096:               # not our format: never let it grow
                    rest = b""
                self._count(lines)
            if rest and not self.lines:             # e.g. an attached HAProxy without our ring
                log.warning("HAProxy's log ring %s: %s", hx.RING, rest[:200].decode(errors="replace"))
            log.info("HAProxy worker %d closed its log stream", pid)
        except (OSError, ValueError) as e:
            log.warning("reading HAProxy's log (worker %s) stopped: %s", pid or "?", e)
        finally:
            self._followed.discard(mine)
            writer.close()
            # never reconnect in a loop: a reader lasts at least RETRY seconds
            await asyncio.sleep(max(0.0, RETRY - (time.monotonic() - started)))

    def _count(self, lines: list[bytes]) -> None:
        parse, record = hcli.parse_log, self.recorder.record
        for raw in lines:
            try:
                rec = parse(raw)
            except Exception:                       # a monitor bug must never stop the log
                log.exception("an HAProxy log line could not be read: %r", raw[:200])
                continue
            if rec is not None:
                self.lines += 1
                record(*rec)
