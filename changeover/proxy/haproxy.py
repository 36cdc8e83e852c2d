"""The HAProxy data plane: the same `DataPlane` driven through a generated config and the runtime API.

One HAProxy (master-worker, `-W`) runs one backend `app`. Each slot named at construction gets
`max_upstreams` servers pre-declared in the config (`server-template blue- 1-16 ... disabled`);
`set_slot()` points them at the app with `set server ... addr ... port` (servers added at run time
with `add server` proxied at well under half the speed in HAProxy 2.6, so they are only the
fallback for slot names or upstream counts beyond that). A switch puts the new slot's servers
in `ready` first and only then the old slot's in `drain` (drain keeps established connections
but takes no new load-balanced traffic), so no request ever meets an empty backend. `drain()`
polls the servers' current sessions and, at the timeout, shuts down what is left.

Per-request records come from HAProxy's own log: a UDP syslog target on loopback, one short
`log-format` line per request, turned into `recorder.record()` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from changeover.errors import ChangeoverError
from changeover.proxy.base import ProxySettings, RequestRecorder

log = logging.getLogger("changeover.proxy.haproxy")
START_TIMEOUT = 10.0

CONFIG = """\
global
    master-worker
    nbthread 1
    stats socket {sock} level admin expose-fd listeners
{log_target}    tune.bufsize {bufsize}
defaults
    mode http
{log_defaults}    option http-keep-alive
    option redispatch 1
    retries {retries}
    retry-on conn-failure empty-response
    timeout http-request {header_ms}ms
    timeout http-keep-alive {idle_ms}ms
    timeout client {body_ms}ms
    timeout connect {connect_ms}ms
    timeout server {response_ms}ms
    timeout tunnel 1h
frontend changeover
    bind {listen}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header Via "1.1 changeover"
{body_limit}    default_backend app
backend app
    balance roundrobin
    http-reuse safe
{templates}"""


class HAProxyDataPlane:
    """`DataPlane` backed by an HAProxy process (see the module docstring)."""

    def __init__(self, settings: ProxySettings, recorder: RequestRecorder | None = None, *,
                 slots: Sequence[str] = ("blue", "green"), max_upstreams: int = 16,
                 binary: str = "haproxy", state_dir: Path | None = None) -> None:
        for name in slots:
            _check_slot_name(name)
        self.settings = settings
        self.recorder = recorder
        self.binary = binary
        self._own_dir = state_dir is None
        self.dir = state_dir or Path(tempfile.mkdtemp(prefix="changeover-haproxy-"))
        self.sock = str(self.dir / "haproxy-admin.sock")
        self._proc: asyncio.subprocess.Process | None = None
        self._servers: dict[str, dict[tuple[str, int], str]] = {}   # slot -> (host, port) -> server
        self._owner: dict[str, str] = {}                             # server -> slot
        self._live: str | None = None
        self._seq = 0
        # pre-declared servers not pointing at any upstream yet, per slot
        self._free: dict[str, list[str]] = {n: [f"{n}-{i}" for i in range(1, max_upstreams + 1)] for n in slots}
        self._templated = {name for names in self._free.values() for name in names}
        self._templates = "".join(f"    server-template {n}- 1-{max_upstreams} 127.0.0.1:1 disabled\n"
                                  for n in slots if max_upstreams > 0)
        self._log: asyncio.DatagramTransport | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._proc is not None:
            return
        if shutil.which(self.binary) is None:
            raise ChangeoverError(f"haproxy data plane: {self.binary!r} not found on PATH")
        loop = asyncio.get_running_loop()
        log_target = log_defaults = ""
        if self.recorder is not None:       # per-request log lines cost HAProxy throughput: only on demand
            self._log, _ = await loop.create_datagram_endpoint(
                lambda: _LogReceiver(self), local_addr=("127.0.0.1", 0))
            log_port = self._log.get_extra_info("sockname")[1]
            log_target = f"    log 127.0.0.1:{log_port} len 1024 local0 info\n"
            log_defaults = '    log global\n    option dontlognull\n    log-format "%b|%s|%ST|%Ta|%ts"\n'
        host, port = self.settings.host, self.settings.port
        if port == 0:                       # HAProxy cannot report a kernel-chosen port: pick one
            with socket.socket() as probe:
                probe.bind((host or "0.0.0.0", 0))
                port = probe.getsockname()[1]
        self._port = port
        s = self.settings
        limit = (f"    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {s.max_body_bytes} }}\n"
                 if s.max_body_bytes else "")
        cfg = CONFIG.format(
            sock=self.sock, log_target=log_target, log_defaults=log_defaults, retries=s.retries,
            listen=f"{host or '0.0.0.0'}:{port}",
            header_ms=int(s.header_timeout * 1000), idle_ms=int(s.idle_timeout * 1000),
            body_ms=int(s.body_timeout * 1000), connect_ms=int(s.connect_timeout * 1000),
            response_ms=int(s.response_timeout * 1000), body_limit=limit, templates=self._templates,
            bufsize=max(16384, min(s.max_header_bytes + 1024, 1 << 20)))  # headers fit: bufsize - maxrewrite
        path = self.dir / "haproxy.cfg"
        path.write_text(cfg)
        self._proc = await asyncio.create_subprocess_exec(
            self.binary, "-W", "-db", "-f", str(path), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        deadline = loop.time() + START_TIMEOUT
        while True:
            if self._proc.returncode is not None:
                err = b""
                if self._proc.stderr is not None:
                    err = await self._proc.stderr.read()
                raise ChangeoverError(f"haproxy did not start: {err.decode(errors='replace').strip()[-800:]}")
            try:
                await self._cmd("show info")
                break
            except OSError:
                if loop.time() > deadline:
                    await self.close()
                    raise ChangeoverError("haproxy did not open its admin socket in time") from None
                await asyncio.sleep(0.05)

    @property
    def port(self) -> int:
        return self._port

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- runtime API -------------------------------------------------------------------------
    def _cmd_sync(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.sock)
            s.sendall(command.encode() + b"\n")
            out = bytearray()
            while chunk := s.recv(65536):
                out += chunk
        return out.decode(errors="replace")

    async def _cmd(self, command: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self._cmd_sync, command)

    def _run(self, command: str) -> None:
        """Commands whose failure is a bug or a dead HAProxy: raise with HAProxy's words."""
        if self._proc is None:
            raise ChangeoverError("the haproxy data plane is not started")
        try:
            out = self._cmd_sync(command)
        except OSError as e:
            raise ChangeoverError(f"haproxy admin socket {self.sock}: {e.strerror or e}") from None
        bad = [line for line in out.splitlines() if line.strip() and _is_error(line)]
        if bad:
            raise ChangeoverError(f"haproxy refused {command!r}: {'; '.join(bad)}")

    # -- DataPlane -----------------------------------------------------------------------------
    def set_slot(self, slot: str, upstreams: Sequence[tuple[str, int]]) -> None:
        _check_slot_name(slot)
        wanted: list[tuple[str, int]] = []
        for item in upstreams:
            try:
                host, port = item
            except (TypeError, ValueError):
                raise ChangeoverError(f"slot {slot}: upstream {item!r} is not (host, port)") from None
            if not isinstance(host, str) or not host or not isinstance(port, int) or not 0 < port < 65536:
                raise ChangeoverError(f"slot {slot}: upstream {item!r} is not (host, port 1-65535)")
            wanted.append((host, port))
        current = self._servers.setdefault(slot, {})
        free = self._free.setdefault(slot, [])
        state = "ready" if slot == self._live else "maint"
        for addr in [a for a in current if a not in wanted]:
            self._retire(current.pop(addr))
        for addr in wanted:
            if addr in current:
                continue
            if free:
                name = free.pop(0)
                self._run(f"set server app/{name} addr {addr[0]} port {addr[1]}; "
                          f"set server app/{name} state {state}")
            else:
                self._seq += 1
                name = f"{slot}-x{self._seq}"
                self._run(f"add server app/{name} {addr[0]}:{addr[1]}")
                if state == "ready":
                    self._run(f"set server app/{name} state ready")
            current[addr] = name
            self._owner[name] = slot

    def _retire(self, name: str) -> None:
        """Take a server out of service; pre-declared ones go back to their slot's free list."""
        self._run(f"set server app/{name} state maint; shutdown sessions server app/{name}")
        slot = self._owner.pop(name, "")
        if name in self._templated:
            self._free.setdefault(slot, []).append(name)
        else:
            self._run(f"del server app/{name}")

    def remove_slot(self, slot: str) -> None:
        if slot == self._live:
            raise ChangeoverError(f"slot {slot} is live; switch away from it before removing it")
        for name in self._servers.pop(slot, {}).values():
            self._retire(name)

    def switch(self, slot: str | None) -> None:
        if slot is not None and slot not in self._servers:
            raise ChangeoverError(f"unknown slot {slot!r} (known: {', '.join(sorted(self._servers)) or 'none'})")
        new = list(self._servers.get(slot, {}).values()) if slot else []
        old = [n for s, servers in self._servers.items() if s != slot for n in servers.values()]
        # one command line, run in order by HAProxy: new servers up first, then the rest to drain
        cmds = [f"set server app/{n} state ready" for n in new]
        cmds += [f"set server app/{n} state drain" for n in old]
        if cmds:
            self._run("; ".join(cmds))
        self._live = slot

    @property
    def live(self) -> str | None:
        return self._live

    def _sessions(self) -> dict[str, int]:
        out = self._cmd_sync("show stat")
        lines = out.splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        cols = lines[0][2:].split(",")
        px, sv, scur = cols.index("pxname"), cols.index("svname"), cols.index("scur")
        result: dict[str, int] = {}
        for line in lines[1:]:
            f = line.split(",")
            if len(f) > scur and f[px] == "app" and f[sv] in self._owner:
                result[f[sv]] = int(f[scur] or 0)
        return result

    def inflight(self, slot: str) -> int:
        names = set(self._servers.get(slot, {}).values())
        if not names or self._proc is None:
            return 0
        try:
            return sum(n for name, n in self._sessions().items() if name in names)
        except OSError:
            return 0

    async def drain(self, slot: str, timeout: float) -> bool:
        names = list(self._servers.get(slot, {}).values())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.inflight(slot):
            if loop.time() >= deadline:
                if names:                # note: HAProxy 2.6 may not cut a stream waiting on its server
                    self._run("; ".join(f"shutdown sessions server app/{n}" for n in names))
                log.warning("drain of slot %s timed out after %.1fs; closed what was left", slot, timeout)
                return False
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        return True

    # -- logs -> recorder ----------------------------------------------------------------------
    def _on_log(self, line: str) -> None:
        if self.recorder is None:
            return
        try:
            payload = line.rsplit(": ", 1)[1].strip()
            _backend, server, status, total_ms, term = payload.split("|")
            slot = self._owner.get(server, "")
            failed = term[:1] == "S" or (term[:1] == "s" and int(status) >= 500)
            self.recorder.record(slot, int(status), max(0, int(total_ms)) / 1000, failed)
        except (IndexError, ValueError):
            return


def _check_slot_name(name: str) -> None:
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum():
        raise ChangeoverError(f"slot name must be letters, digits or _, got {name!r}")


def _is_error(line: str) -> bool:
    low = line.lower()
    return any(w in low for w in ("unknown", "no such", "not found", "error", "invalid", "require",
                                  "cannot", "can't", "failed", "refused", "already exists"))


class _LogReceiver(asyncio.DatagramProtocol):
    def __init__(self, plane: HAProxyDataPlane) -> None:
        self.plane = plane

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        with contextlib.suppress(Exception):
            self.plane._on_log(data.decode(errors="replace"))
