"""The shared front's wire: its control socket (with the caller's uid) and starting its process.

Kept apart from proxy/front.py so that a daemon (proxy/shared.py) and the CLI reach a front
without loading the proxy itself. The protocol is rpc's (one JSON line per request and reply);
the front checks per request what the caller may do (proxy/front.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from changeover import rpc
from changeover.errors import ChangeoverError, ConfigError
from changeover.proxy.base import ProxySettings
from changeover.proxy.tls_settings import TlsSettings

log = logging.getLogger("changeover.proxy.front")

FRONT_PROTOCOL = 1
MOVED = "the shared front was handed over to a new process"   # the client retries on this
START_TIMEOUT = 10.0
Handler = Callable[[dict[str, Any], int], Awaitable[Any]]


async def serve(path: Path, handlers: dict[str, Handler]) -> asyncio.AbstractServer:
    """The control socket: rpc's line protocol, with the caller's uid (SO_PEERCRED) passed to the
    handler. Mode 0660: the front's user and group reach it (root's front: add project users to
    the group of the socket's directory); what they may do is checked per request."""
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))[1]
            line = await reader.readline()
            if not line:
                return
            try:
                req = json.loads(line)
                op, args = str(req["op"]), dict(req.get("args") or {})
            except (ValueError, KeyError, TypeError, AttributeError):
                reply: dict[str, Any] = {"ok": False, "error": "bad request", "type": "DaemonError", "exit_code": 3}
            else:
                handler = handlers.get(op)
                if handler is None:
                    reply = {"ok": False, "error": f"the shared front has no operation {op!r}",
                             "type": "DaemonError", "exit_code": 3}
                else:
                    try:
                        reply = {"ok": True, "result": await handler(args, uid)}
                    except ChangeoverError as e:
                        reply = {"ok": False, "error": str(e), "type": type(e).__name__, "exit_code": e.exit_code}
                        if isinstance(e, ConfigError):
                            reply.update(file=e.file, key=e.key)
                    except Exception as e:
                        log.exception("front request %s failed", op)
                        reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}",
                                 "type": "InternalError", "exit_code": 1}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o117)
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=rpc.MAX_LINE)
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    if os.getuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(path, 0, os.stat(path.parent).st_gid)
    return server


async def start_front(socket_path: Path, registry: Path, settings: ProxySettings,
                      public: Path | None = None) -> int:
    """Start a front process in its own session, its control socket at `socket_path` (a
    successor's, renamed to `public` once it runs); returns its pid once it listens. Its log is
    next to the socket."""
    public = public or socket_path
    log_path = public.with_name(public.name + ".log")
    cmd = [sys.executable, "-m", "changeover.proxy.front", "--socket", str(public), "--bind", str(socket_path),
           "--registry", str(registry), "--settings", json.dumps(dataclasses.asdict(settings))]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fd,
                                start_new_session=True, close_fds=True, cwd="/")   # pins no project
    finally:
        os.close(fd)
    msg = await rpc.ready_line(proc, START_TIMEOUT)
    if msg is None:
        raise ChangeoverError(f"the shared front did not start within {START_TIMEOUT}s (see {log_path})")
    if not msg.get("ready"):
        if msg.get("reason") == "listen":
            raise ConfigError(str(msg.get("error")), key="proxy.listen")
        raise ChangeoverError(f"the shared front could not start: {msg.get('error') or proc.returncode} "
                              f"(see {log_path})")
    threading.Thread(target=proc.wait, name="reap-front", daemon=True).start()
    return int(msg["pid"])


def settings_from_json(text: str) -> ProxySettings:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    if isinstance(fields.get("tls"), dict):          # [proxy.tls], nested in the JSON
        fields["tls"] = TlsSettings.from_wire(fields["tls"])
    return ProxySettings(**fields)
