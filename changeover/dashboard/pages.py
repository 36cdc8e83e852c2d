"""What the pages read besides the control API: changeover.toml (the monitor's limits, to show
each trigger's reading against its limit) and the migrations, through the same functions as
`changeover migrate status` and `changeover migrate plan`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from changeover import config as config_mod
from changeover.config import Config
from changeover.errors import ChangeoverError
from changeover.migrations import commands as migrate
from changeover.redact import redact_obj

log = logging.getLogger("changeover.dashboard")


class Pages:
    def __init__(self, file: Path) -> None:
        self.file = file
        self._config: Config | None = None
        self._stamp: tuple[float, float] | None = None
        self.config_error: str | None = None

    def _mtimes(self) -> tuple[float, float]:
        def m(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        return m(self.file), m(self.file.parent / ".env")

    def config(self) -> Config | None:
        """The file as it is now (re-read when it or .env changed); the last good one while it is
        invalid, with the error said on the page."""
        stamp = self._mtimes()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._config = config_mod.load(self.file)
                self.config_error = None
            except ChangeoverError as e:
                self.config_error = str(e)
        return self._config

    def limits(self) -> dict[str, Any]:
        cfg = self.config()
        if cfg is None:
            return {}
        m = cfg.monitor
        return {"observe": m.observe, "window": m.window, "error_rate": m.error_rate, "min_requests": m.min_requests,
                "confidence": m.confidence, "consecutive_failures": m.consecutive_failures,
                "latency_ratio": m.latency_ratio, "latency_min_increase": m.latency_min_increase,
                "crash_loop": f"{m.crash_loop_crashes} crashes within {m.crash_loop_within:g} s",
                "probe_failures": m.probe_failures, "keep_standby": m.keep_standby,
                "config_error": self.config_error}

    async def migrations(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._migrations)

    def _migrations(self) -> dict[str, Any]:
        cfg = self.config()
        if cfg is None:
            return {"error": self.config_error or "changeover.toml could not be read"}
        # The database a deploy migrates: the release's DATABASE_URL ([env]), else [migrations] database.
        url = config_mod.release_env(cfg, None).get("DATABASE_URL") or None
        try:
            if not migrate.enabled(cfg, database_url=url):
                return {"off": "no migrations here: [migrations] needs a database (or DATABASE_URL) and a dir"}
            status = migrate.status(cfg, database_url=url).to_json()
            plan = migrate.plan(cfg, database_url=url).to_json()
        except ChangeoverError as e:
            return {"error": str(e)}
        return dict(redact_obj({"status": status, "plan": plan}))
