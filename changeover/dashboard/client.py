"""The dashboard's only way to the daemon: the typed control API over `.changeover/control.sock`.

Exactly what the CLI sends (api argument dataclasses, api.PROTOCOL on every request), so the
dashboard can do nothing the CLI cannot, decodes nothing of its own, and gets the same errors.
Running inside the daemon's process changes none of that: it is a client like any other.
Everything it returns is masked (changeover.redact) before a page or a stream can show it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from changeover import api, rpc
from changeover.api import Op
from changeover.redact import redact_obj

OnEvent = Callable[[dict[str, Any]], Awaitable[None]]
READ_TIMEOUT = 10.0


class Client:
    def __init__(self, socket_path: Path, actor: str = "dashboard") -> None:
        self.socket_path = socket_path
        self.actor = actor

    async def call(self, op: Op, args: Any = None, on_event: OnEvent | None = None,
                   timeout: float | None = READ_TIMEOUT) -> Any:
        wire = api.encode(args) if args is not None else {}
        result: Any = None
        async for msg in rpc.stream(self.socket_path, str(op), wire, timeout=timeout, protocol=api.PROTOCOL):
            if "result" in msg:
                result = msg["result"]
            elif on_event is not None:
                await on_event(redact_obj(msg))
        return redact_obj(result)

    # -- reads ------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        return dict(await self.call(Op.STATUS))

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(await self.call(Op.HISTORY, api.HistoryArgs(limit=limit)))

    async def series(self, seconds: int) -> dict[str, Any]:
        return dict(await self.call(Op.SERIES, api.SeriesArgs(seconds=seconds)))

    async def releases(self) -> list[dict[str, Any]]:
        return list(await self.call(Op.RELEASES))

    # -- actions (no timeout: a cold rollback or a deploy takes as long as it takes) ---------------
    async def rollback(self, reason: str, on_event: OnEvent | None = None) -> dict[str, Any]:
        args = api.RollbackArgs(reason=reason, actor=self.actor)
        return dict(await self.call(Op.ROLLBACK, args, on_event, timeout=None))

    async def promote(self, on_event: OnEvent | None = None) -> dict[str, Any]:
        return dict(await self.call(Op.PROMOTE, api.PromoteArgs(actor=self.actor), on_event, timeout=None))

    async def stop_standby(self, on_event: OnEvent | None = None) -> dict[str, Any]:
        return dict(await self.call(Op.STOP_STANDBY, None, on_event, timeout=None))

    async def deploy(self, version: str, path: str, on_event: OnEvent | None = None) -> dict[str, Any]:
        args = api.DeployArgs(version=version, path=path, actor=self.actor)
        return dict(await self.call(Op.DEPLOY, args, on_event, timeout=None))
