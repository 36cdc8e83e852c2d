"""The HAProxy process changeover runs (or attaches to) for `[proxy] engine = "haproxy"`:
started in master-worker mode in a session of its own, adopted by a restarted daemon, reloaded
without a gap through the master CLI, stopped. The runtime API on top is haproxy_engine.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from changeover.errors import ChangeoverError, ConfigError, DaemonError
from changeover.monitor.metrics import Recorder
from changeover.proxy import haproxy as hx
from changeover.proxy import haproxy_cli as hcli
from changeover.proxy.base import ProxySettings, probe_bind
from changeover.proxy.haproxy_log import LogFollower

log = logging.getLogger("changeover.proxy.haproxy")
START_TIMEOUT = 10.0
POLL = 0.05                 # drain and start-up polling interval


class HAProxyProcess:
    def __init__(self, settings: ProxySettings, state_dir: Path, binary: str = "haproxy") -> None:
        self.settings = settings
        self.binary = binary
        self.paths = hx.Paths.under(state_dir / "haproxy")
        self.attached = settings.haproxy_socket is not None
        self.admin = Path(settings.haproxy_socket) if settings.haproxy_socket else self.paths.admin
        self.recorder = Recorder()
        self.pid: int | None = None
        self.port: int | None = None
        self.follower = LogFollower(self.admin, self.recorder)
        self._baseline: tuple[int, int] | None = None   # (HAProxy requests, log lines) when counting began

    # -- lifecycle ------------------------------------------------------------------------------
    async def ensure(self, initial: dict[str, Any] | None = None) -> str:
        if await self._answers():
            await self._adopt()
            return "adopted"
        if self.attached:
            raise ConfigError(f"HAProxy does not answer on {self.admin}", key="proxy.haproxy_socket")
        master = self._our_master()
        if master is not None:              # started but not answering yet (or stuck): give it time
            if await self._wait_answers(master):
                await self._adopt()
                return "adopted"
            log.warning("HAProxy master %d does not answer; stopping it and starting a new one", master)
            await self._stop(master)
        await self._start(initial)
        return "started"

    async def _adopt(self) -> None:
        info = hcli.parse_info(await self._cli("show info"))
        worker = int(info.get("Pid", "0") or 0)
        self.pid = self._master_of(worker) if worker else None
        self.port = self.settings.port or None
        text = self._written()
        if text is not None:
            self.port = hx.written_port(text) or self.port
        log.info("adopted HAProxy (master %s, worker %d) on port %s", self.pid, worker, self.port)
        await self.follower.follow(fresh=False)        # from now on: what an earlier daemon read is not read again

    async def _start(self, initial: dict[str, Any] | None) -> None:
        if shutil.which(self.binary) is None:
            raise ConfigError(f'engine = "haproxy", but {self.binary!r} is not on PATH (install HAProxy 2.6+)',
                              key="proxy.engine")
        port = self._pick_port()
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        self.paths.output.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.paths.admin, self.paths.master, self.paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._write(hx.render(self.settings, self.paths, port, initial))
        since = self._output_size()
        out = open(self.paths.output, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                [self.binary, "-W", "-S", f"{self.paths.master},mode,600", "-p", str(self.paths.pidfile),
                 "-f", str(self.paths.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True)
        finally:
            out.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await self._answers():
            if proc.poll() is not None:
                raise self._start_error(f"HAProxy exited with {proc.returncode}", since)
            if loop.time() > deadline:
                proc.kill()
                proc.wait()
                raise DaemonError(f"HAProxy did not start within {START_TIMEOUT:g}s (see {self.paths.output})")
            await asyncio.sleep(POLL)
        # HAProxy is in its own session and outlives us; a daemon thread reaps it if it exits
        # while we run (an executor thread would hold up the daemon's exit until it does).
        threading.Thread(target=proc.wait, name="reap-haproxy", daemon=True).start()
        self.pid, self.port = proc.pid, port
        for slot, version in ((initial or {}).get("versions") or {}).items():
            self.recorder.set_version(slot, str(version))
        self._baseline = None
        await self.follower.follow(fresh=True)         # a new worker: its whole ring is unread
        log.info("HAProxy started (master %d, port %d)", proc.pid, port)

    def _output_size(self) -> int:
        try:
            return self.paths.output.stat().st_size
        except OSError:
            return 0

    def _start_error(self, what: str, since: int) -> ChangeoverError:
        """The error of a start or reload, in HAProxy's words (what it wrote since `since`)."""
        try:
            with open(self.paths.output, "rb") as f:
                f.seek(since)
                tail = f.read().decode(errors="replace").strip().splitlines()[-6:]
        except OSError:
            tail = []
        alerts = "; ".join(line for line in tail if "ALERT" in line) or "; ".join(tail)
        if "cannot bind" in alerts or "Address already in use" in alerts:
            return ConfigError(f"cannot listen on {self.settings.listen}: {alerts}", key="proxy.listen")
        return DaemonError(f"{what}: {alerts or 'no output'} (see {self.paths.output})")

    def _pick_port(self) -> int:
        """HAProxy cannot bind port 0: choose one (the one already written, for a restart), and
        make sure nobody listens on a configured one before starting from scratch."""
        port = self.settings.port
        host = self.settings.host or "0.0.0.0"
        if port == 0:
            text = self._written()
            port = (hx.written_port(text) if text else None) or 0
        try:
            return probe_bind(host, port)
        except OSError as e:
            if self.settings.port == 0:
                return probe_bind(host, 0)     # the written one is taken now: any free one
            raise ConfigError(f"cannot listen on {self.settings.listen}: {e.strerror or e} "
                              "(another process uses it)", key="proxy.listen") from None

    async def shutdown(self) -> None:
        """Stop HAProxy if changeover runs it (the daemon drained the slots before) and remove
        its sockets; an attached HAProxy is left alone."""
        if not self.attached:
            master = self._our_master()
            if master is not None:
                await self._stop(master)
            for path in (self.paths.admin, self.paths.master, self.paths.pidfile):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        await self.close()

    async def close(self) -> None:
        """Stop reading the log, leaving HAProxy running (the daemon exits, a successor adopts)."""
        await self.follower.close()

    async def _stop(self, master: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGTERM)     # hard stop: the daemon has drained what mattered
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while _alive(master) and loop.time() < deadline:
            await asyncio.sleep(POLL)
        if _alive(master):
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGKILL)
        self.pid = None

    # -- which HAProxy is ours ------------------------------------------------------------------
    def _our_master(self) -> int | None:
        """The master named by the pid file, if it is alive and runs our config."""
        try:
            pid = int(self.paths.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.paths.config) in _cmdline(pid) else None

    @staticmethod
    def _master_of(worker: int) -> int:
        try:
            ppid = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return worker
        return ppid if "haproxy" in _cmdline(ppid) else worker

    async def _answers(self) -> bool:
        try:
            return "Pid:" in await self._cli("show info", timeout=2)
        except (OSError, ChangeoverError):
            return False

    async def _wait_answers(self, master: int) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while _alive(master) and loop.time() < deadline:
            if await self._answers():
                return True
            await asyncio.sleep(POLL)
        return False

    # -- ProxyControl: hitless reload ------------------------------------------------------------
    async def handover(self, initial: dict[str, Any],
                       configure: Callable[[Any], Awaitable[None]]) -> None:
        """Reload through the master CLI: the master starts a new worker on the new config, which
        takes the listening sockets from the old one (-x, expose-fd listeners); the old worker
        stops accepting, finishes what it has (idle keep-alive clients get Connection: close on
        their next answer) and exits, at the latest after drain_timeout (hard-stop-after)."""
        if self.attached:
            raise ChangeoverError(f"HAProxy is attached through [proxy] haproxy_socket ({self.admin}): "
                                  "reload it the way it is run (systemctl reload haproxy)")
        before = self._written()
        try:
            old_worker = int(hcli.parse_info(await self._cli("show info")).get("Pid", "0") or 0)
        except OSError as e:
            raise DaemonError(f"HAProxy does not answer on {self.admin} ({e}): nothing to reload") from None
        port = self.settings.port or (hx.written_port(before) if before else None) or self._pick_port()
        self._write(hx.render(self.settings, self.paths, port, initial))
        since = self._output_size()
        try:
            failed = hcli.failed_reloads(await self._master("show proc"))
            await self._master("reload")
            await self._wait_new_worker(old_worker, failed)
        except (OSError, ChangeoverError) as e:
            if before is not None:
                self._write(before)     # what runs is still the old config: say so on disk too
            raise self._start_error(f"HAProxy reload failed ({e})", since) from None
        self.port = port
        self._baseline = None
        await self.follower.follow(fresh=True)         # the new worker's ring; the old reader ends with its worker
        await configure(self)
        log.info("HAProxy reloaded: worker %d -> new worker", old_worker)

    async def _wait_new_worker(self, old: int, failed: int) -> None:
        """Until the admin socket is served by a new worker; a new config HAProxy refused shows
        as one more failed reload on the master (the old worker then goes on serving)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            with contextlib.suppress(OSError):
                pid = int(hcli.parse_info(await self._cli("show info", timeout=2)).get("Pid", "0") or 0)
                if pid and pid != old:
                    return
            with contextlib.suppress(OSError):
                if hcli.failed_reloads(await hcli.cli(self.paths.master, "show proc", timeout=2)) > failed:
                    raise ChangeoverError("HAProxy refused the new config")
            await asyncio.sleep(POLL)
        raise ChangeoverError(f"no new worker within {START_TIMEOUT:g}s")

    # -- the CLIs and the written config ------------------------------------------------------
    async def _master(self, command: str) -> str:
        """A master CLI command. Just after a reload the master re-executes itself and its
        socket refuses connections for a moment: retry until START_TIMEOUT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            try:
                return await hcli.cli(self.paths.master, command)
            except (ConnectionRefusedError, FileNotFoundError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(POLL)

    async def _cli(self, command: str, timeout: float = hx.CLI_TIMEOUT) -> str:
        return await hcli.cli(self.admin, command, timeout)

    def _written(self) -> str | None:
        if self.attached:
            return None
        try:
            return self.paths.config.read_text()
        except OSError:
            return None

    def _write(self, text: str) -> None:
        tmp = self.paths.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.paths.config)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
