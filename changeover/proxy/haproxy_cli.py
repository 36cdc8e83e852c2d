"""HAProxy's runtime API as the engine speaks it: one command line on the stats or master socket,
and what its answers mean (servers and their state, connections, tunnels, reloads), plus the
per-request log lines it writes into the ring. Apart from `cli()`, which sends a command, these
are pure functions on text, tested without HAProxy; the config they go with is haproxy.py's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from changeover.proxy.haproxy import BACKEND, CLI_TIMEOUT, LOG_TAG, PARKED_PORT

# Admin state bits of `show servers state` (HAProxy's SRV_ADMF_*): forced/inherited/resolver/
# hostname maintenance, and forced/inherited drain. 0x04 only records "disabled in the config".
_MAINT_BITS = 0x01 | 0x02 | 0x20 | 0x40
_DRAIN_BITS = 0x08 | 0x10


@dataclass(frozen=True)
class Server:
    name: str
    slot: str
    host: str
    port: int
    state: str        # "ready" | "drain" | "maint"

    @property
    def parked(self) -> bool:
        return self.port == PARKED_PORT

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


async def cli(path: Path | str, command: str, timeout: float = CLI_TIMEOUT) -> str:
    """One command line on a stats or master socket; the answer is everything until it closes.
    The write side is shut after the command: the master CLI waits for that before answering."""
    async def go() -> str:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            return (await reader.read()).decode(errors="replace")
        finally:
            writer.close()
    try:
        async with asyncio.timeout(timeout):
            return await go()
    except TimeoutError:
        raise OSError(f"no answer within {timeout:g}s") from None


_ERRORS = ("unknown", "no such", "not found", "error", "invalid", "require", "cannot", "can't",
           "failed", "refused", "already exists", "expects", "permission denied")


def cli_errors(out: str) -> list[str]:
    """The lines of a CLI answer that report a failure (HAProxy answers in prose)."""
    return [line.strip() for line in out.splitlines() if line.strip() and any(w in line.lower() for w in _ERRORS)]


def parse_servers_state(out: str) -> list[Server]:
    """`show servers state <backend>`: one Server per line of our backend."""
    lines = [line for line in out.splitlines() if line.strip()]
    header = next((line for line in lines if line.startswith("# be_id")), None)
    if header is None:
        return []
    cols = header[2:].split()
    ix = {name: cols.index(name) for name in ("be_name", "srv_name", "srv_addr", "srv_admin_state", "srv_port")}
    servers = []
    for line in lines:
        f = line.split()
        if line.startswith("#") or len(f) < len(cols) or f[ix["be_name"]] != BACKEND:
            continue
        name = f[ix["srv_name"]]
        admin = int(f[ix["srv_admin_state"]])
        state = "maint" if admin & _MAINT_BITS else "drain" if admin & _DRAIN_BITS else "ready"
        servers.append(Server(name, slot_of(name), f[ix["srv_addr"]], int(f[ix["srv_port"]]), state))
    return servers


def slot_of(server: str) -> str:
    return server.rsplit("-", 1)[0]


def parse_tunnels(out: str) -> dict[str, int]:
    """`show sess all`: the streams of the backend that became tunnels (a 101 was answered: a
    WebSocket, mostly), per server. A stream's block names its backend and server before its txn."""
    result: dict[str, int] = {}
    backend = server = ""
    for line in out.splitlines():
        f = line.split()
        if not f:
            continue
        if line.startswith("0x"):          # a new stream
            backend = server = ""
        elif f[0].startswith("backend="):
            backend = f[0][8:]
        elif f[0].startswith("server="):
            server = f[0][7:]
        elif f[0].startswith("txn=") and "status=101" in f and backend == BACKEND and server:
            result[server] = result.get(server, 0) + 1
    return result


def parse_stat(out: str) -> dict[str, dict[str, int]]:
    """`show stat`: per server of our backend, the counters changeover reads."""
    lines = out.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    cols = lines[0][2:].split(",")
    wanted = ("scur", "stot", "hrsp_5xx", "econ", "eresp")
    ix = {name: cols.index(name) for name in ("pxname", "svname", *wanted)}
    result: dict[str, dict[str, int]] = {}
    for line in lines[1:]:
        f = line.split(",")
        if len(f) < len(cols) or f[ix["pxname"]] != BACKEND or f[ix["svname"]] in ("BACKEND", "FRONTEND"):
            continue
        result[f[ix["svname"]]] = {name: int(f[ix[name]] or 0) for name in wanted}
    return result


def parse_conns(out: str) -> dict[str, int]:
    """`show servers conn <backend>`: connections in use per server."""
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#"):
        return {}
    cols = lines[0][1:].split()
    used = cols.index("used_cur")
    result = {}
    for line in lines[1:]:
        f = line.split()
        if len(f) > used and "/" in f[0]:
            backend, server = f[0].split("/", 1)
            if backend == BACKEND:
                result[server] = int(f[used])
    return result


def parse_info(out: str) -> dict[str, str]:
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def failed_reloads(show_proc: str) -> int:
    """The master's count of reloads whose new config failed (`show proc` on the master CLI)."""
    m = re.search(r"\[failed: (\d+)\]", show_proc)
    return int(m.group(1)) if m else 0


def commands(*lines: Sequence[str]) -> str:
    """One `;`-joined command line: HAProxy runs it in order, in one go."""
    return "; ".join(c for group in lines for c in group)


# -- per-request log ------------------------------------------------------------------------------

def parse_log(line: bytes) -> tuple[str, int, float, bool] | None:
    """A line of our log-format -> (slot, status, seconds, upstream failed); None for other lines.

    Latency is measured by HAProxy in microseconds from the request head to the log (end of the
    response); a tunnel (101) counts until its upgrade answer (%Tr), as the embedded proxy does.
    `upstream failed` is a session the server side ended: refused, reset or timed out (S/s).
    Runs once per request in the daemon: bytes in, no decoding of what is not needed.
    """
    f = line.split(b"|")
    if len(f) != 6 or f[0] != _TAG:
        return None
    try:
        status = int(f[2])
        us, tr = f[3], int(f[4])
        seconds = max(0, tr) / 1000 if status == 101 or not us or us == b"-" else max(0, int(us)) / 1e6
    except ValueError:
        return None
    server = f[1]
    slot = "" if server[:1] == b"<" else server.rsplit(b"-", 1)[0].decode()   # <NOSRV>: no slot took it
    return slot, max(status, 0), seconds, f[5][:1] in (b"S", b"s")


_TAG = LOG_TAG.encode()
