"""JSON lines over a unix socket: the control API (CLI -> daemon) and the proxy worker's socket.

A request is one line `{"op": ..., "args": {...}}`. The server answers with any number of
`{"event": {...}}` lines (progress of a long operation, e.g. a deploy's steps) and then exactly
one `{"ok": true, "result": ...}` or `{"ok": false, "error": ..., "type": ..., "exit_code": N}`.
One request per connection keeps both sides trivial and lets a CLI that goes away (Ctrl-C) not
disturb the operation it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from changeover import errors
from changeover.errors import ChangeoverError, DaemonError

log = logging.getLogger("changeover.rpc")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]
MAX_LINE = 16 * 1024 * 1024


def _error_payload(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ChangeoverError):
        out = {"ok": False, "error": str(e), "type": type(e).__name__, "exit_code": e.exit_code}
        if isinstance(e, errors.ConfigError):
            out.update(file=e.file, key=e.key)
        return out
    return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}", "type": "InternalError",
            "exit_code": 1}


async def serve(path: Path, handlers: dict[str, Handler], protocol: int | None = None) -> asyncio.AbstractServer:
    """Listen on `path` (mode 0600: only the owner controls deploys). With `protocol`, a request of
    another protocol version is refused with a clear error instead of being misread."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def emit(event: dict[str, Any]) -> None:
            if writer.is_closing():
                return
            writer.write(json.dumps({"event": event}).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()

        try:
            line = await reader.readline()
            if not line:
                return
            try:
                req = json.loads(line)
                op, args = req["op"], req.get("args") or {}
                handler = handlers.get(op)
                theirs = req.get("protocol")
            except (ValueError, KeyError, TypeError, AttributeError):
                reply: dict[str, Any] = {"ok": False, "error": "bad request", "type": "DaemonError", "exit_code": 3}
            else:
                if protocol is not None and theirs != protocol:
                    reply = {"ok": False, "type": "ProtocolMismatch", "exit_code": 3, "protocol": protocol,
                             "error": f"this daemon speaks control protocol {protocol} and the client "
                                      f"{theirs or 1}: use the changeover of the same version as the daemon, "
                                      "or restart the daemon after an upgrade (the app keeps serving)"}
                elif handler is None:
                    reply = {"ok": False, "error": f"unknown operation {op!r} (a client newer than the daemon?)",
                             "type": "DaemonError", "exit_code": 3}
                else:
                    reply = await _handle(op, handler, args, emit)
            if not writer.is_closing():
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_LINE)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


async def _handle(op: str, handler: Handler, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
    try:
        return {"ok": True, "result": await handler(args, emit)}
    except Exception as e:
        if not isinstance(e, ChangeoverError):
            log.exception("control request %s failed", op)
        return _error_payload(e)


def _raise(reply: dict[str, Any]) -> None:
    cls = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, ChangeoverError)):
        cls = DaemonError if reply.get("type") == "ProtocolMismatch" else ChangeoverError
    err = cls.__new__(cls)
    Exception.__init__(err, reply.get("error", "unknown error"))
    if isinstance(err, errors.ConfigError):   # the file and key survive the socket
        err.file, err.key = reply.get("file"), reply.get("key")
    code = reply.get("exit_code")
    if isinstance(code, int):
        err.exit_code = code
    raise err


async def stream(path: Path, op: str, args: dict[str, Any] | None = None,
                 timeout: float | None = None, protocol: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """Send one request; yield its events; the final result is yielded as {"result": ...}."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that lands as the call
    # finishes, and a caller that is being stopped (the daemon's proxy watchdog) would run on
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonError(f"the daemon is not running (no socket at {path}); start it with "
                          "`changeover serve`") from None
    except (OSError, TimeoutError) as e:
        raise DaemonError(f"cannot reach the daemon at {path}: {e}") from None
    try:
        req: dict[str, Any] = {"op": op, "args": args or {}}
        if protocol is not None:
            req["protocol"] = protocol
        writer.write(json.dumps(req).encode() + b"\n")
        await writer.drain()
        while True:
            async with asyncio.timeout(timeout):
                line = await reader.readline()
            if not line:
                raise DaemonError("the daemon closed the connection (did it stop or crash? see "
                                  ".changeover/daemon.log)")
            msg = json.loads(line)
            if "event" in msg:
                yield msg["event"]
                continue
            if not msg.get("ok"):
                _raise(msg)
            yield {"result": msg.get("result")}
            return
    except TimeoutError:
        raise DaemonError(f"no answer from the daemon within {timeout}s") from None
    except (ConnectionError, ValueError) as e:
        raise DaemonError(f"control connection failed: {e}") from None
    finally:
        writer.close()


async def call(path: Path, op: str, args: dict[str, Any] | None = None, timeout: float | None = 30,
               protocol: int | None = None) -> Any:
    result: Any = None
    async for msg in stream(path, op, args, timeout, protocol):
        if "result" in msg:
            result = msg["result"]
    return result


async def ready_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """The one JSON line a process we started (a proxy worker, the shared front) prints on stdout
    once it listens, or to say why it cannot: {"ready": true, ...} or {"error", "reason"}. A
    process that did not say so is waited for (its status is in `proc.returncode`); None when it
    printed nothing within `timeout` (it is killed)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            line = await loop.run_in_executor(None, stdout.readline)
    except TimeoutError:
        proc.kill()
        return None
    finally:
        stdout.close()
    try:
        msg = json.loads(line or b"{}")
    except ValueError:
        msg = {}
    if not isinstance(msg, dict):
        msg = {}
    if not msg.get("ready"):
        await loop.run_in_executor(None, proc.wait)
    return msg
