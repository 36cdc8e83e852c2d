"""The dashboard inside the daemon: a uvicorn server run as a task of the daemon's own (uvloop)
event loop, started once the control socket listens and stopped before the daemon's parts.

The daemon owns the process's signals (SIGTERM, SIGINT, SIGHUP): uvicorn's own handlers are not
installed. The socket is bound here, so a port already in use is said in one log line and the
daemon carries on without a dashboard (deploys and rollbacks do not need it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from changeover.config import Config
from changeover.dashboard import auth
from changeover.dashboard.client import Client
from changeover.dashboard.feed import Feed
from changeover.dashboard.pages import Pages
from changeover.dashboard.web import Web

log = logging.getLogger("changeover.dashboard")
SHUTDOWN_GRACE = 3


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield   # the daemon's handlers stay in place


def url_path(state_dir: Path) -> Path:
    return state_dir / auth.URL_FILE


class Dashboard:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.dashboard
        self.state_dir = config.state_dir
        self.feed = Feed(Client(config.socket_path))
        self.web: Web | None = None
        self.url: str | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _bind(self) -> socket.socket:
        host, port = self.settings.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        keys = auth.Keys(auth.ensure_token(self.state_dir))
        self.web = Web(self.feed, keys, Pages(self.config.file), secure=self.settings.tls)
        sock = self._bind()
        port = int(sock.getsockname()[1])
        cfg = uvicorn.Config(self.web.app, lifespan="off", log_config=None, access_log=False, ws="none",
                             ssl_certfile=self.settings.tls_cert, ssl_keyfile=self.settings.tls_key,
                             timeout_graceful_shutdown=SHUTDOWN_GRACE, server_header=False)
        self._server = _Server(cfg)
        self.feed.start()
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="dashboard")
        while not self._server.started:
            if self._task.done():
                self._task.result()   # it failed to start: say why
                raise OSError("the dashboard server stopped at once")
            await asyncio.sleep(0.01)
        self.url = self.settings.url(port)
        url_path(self.state_dir).write_text(self.url + "\n")
        log.info("dashboard on %s (`changeover dashboard` prints the login URL)", self.url)

    async def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            url_path(self.state_dir).unlink()
        self.feed.closing = True
        self.feed.bump()          # open event streams see `closing` and end
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE + 2):
                    await self._task
            except (TimeoutError, asyncio.CancelledError, SystemExit):
                self._task.cancel()
        await self.feed.close()


async def start(config: Config) -> Dashboard | None:
    """The daemon's hook: the dashboard for this config, or None (disabled, or it cannot listen)."""
    if not config.dashboard.enabled:
        return None
    d = Dashboard(config)
    try:
        await d.start()
    except (OSError, SystemExit) as e:
        log.error("the dashboard cannot listen on %s: %s; the daemon runs without it", config.dashboard.listen,
                  getattr(e, "strerror", None) or e)
        await d.close()
        return None
    return d
