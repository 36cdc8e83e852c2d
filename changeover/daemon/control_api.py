"""The daemon's control API: one handler per op of `changeover.api`, each decoding its typed
arguments and calling the part of the daemon that does the work (the pipeline's phase verbs, the
traffic modes, the telemetry, the state's history). `Daemon` (server.py) serves them on the
control socket and adds the lifecycle verbs (`reload`, `reload-proxy`, `down`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from changeover import api, rpc
from changeover.config import Config
from changeover.daemon import builds
from changeover.daemon.pipeline import Pipeline
from changeover.daemon.telemetry import Telemetry
from changeover.daemon.traffic import TrafficModes, merge_history
from changeover.errors import ChangeoverError
from changeover.state import State

log = logging.getLogger("changeover.daemon")


class ControlApi:
    """The ops' handlers (`h_<op>`), mixed into `Daemon`, which holds what they use."""

    config: Config
    state: State
    pipeline: Pipeline
    traffic: TrafficModes
    telemetry: Telemetry
    started_at: float

    async def fresh_config(self) -> Config:
        """changeover.toml and .env as they are now (Daemon.fresh_config)."""
        raise NotImplementedError

    async def status(self) -> dict[str, Any]:
        """What `changeover status` shows (Daemon.status)."""
        raise NotImplementedError

    async def h_ping(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return {"pid": os.getpid(), "uptime": time.time() - self.started_at, "protocol": api.PROTOCOL}

    async def h_status(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.status()

    async def h_deploy(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.DeployArgs, args)
        if self.pipeline.active is not None:
            raise self.pipeline.busy_error()
        config = await self.fresh_config()
        if self.traffic.in_maintenance():
            await emit({"type": "check", "name": "maintenance", "ok": True,
                        "detail": "maintenance is on: users keep getting the maintenance page until `changeover "
                                  "maintenance off`; the release is verified on its slot directly"})
        return await self.pipeline.deploy(config, a.version, a.path, emit, wait=a.wait, env=a.env, actor=a.actor,
                                          no_switch=a.no_switch, source=builds.Source.of(a.git, a.archive))

    async def h_prepare(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.h_deploy({**args, "no_switch": True}, emit)

    async def h_switch(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.SwitchArgs, args)
        return await self.pipeline.switch(emit, wait=a.wait)

    async def h_promote(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.PromoteArgs, args)
        return await self.pipeline.promote(a.actor)

    async def h_abort(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.AbortArgs, args)
        return await self.pipeline.abort(a.reason, a.actor)

    async def h_rollback(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.RollbackArgs, args)
        try:
            config = await self.fresh_config()
        except ChangeoverError as e:
            # A rollback is the emergency exit: a broken file must not block it.
            log.warning("rolling back with the config the daemon read last: %s", e)
            await emit({"type": "check", "name": "config", "ok": False,
                        "detail": f"{e} (rolling back with the config read last)"})
            config = self.config
        return await self.pipeline.rollback(config, emit, reason=a.reason, actor=a.actor, schema=a.schema,
                                            allow_data_loss=a.allow_data_loss, wait=a.wait)

    async def h_drill(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.DrillArgs, args)
        return await self.pipeline.drill(await self.fresh_config(), emit, actor=a.actor, max_reaction=a.max_reaction)

    async def h_stop_standby(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return await self.pipeline.stop_standby()

    async def h_series(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        from changeover.dashboard import ops  # read-only ops for the dashboard

        return ops.series(self.telemetry.recorder, self.state, api.decode(api.SeriesArgs, args).seconds)

    async def h_releases(self, args: dict[str, Any], emit: rpc.Emit) -> list[dict[str, Any]]:
        from changeover.dashboard import ops

        return ops.releases(self.state)

    async def h_history(self, args: dict[str, Any], emit: rpc.Emit) -> list[dict[str, Any]]:
        a = api.decode(api.HistoryArgs, args)
        if a.traffic:
            return merge_history(self.state.history(limit=a.limit), self.state.mode_events(a.limit), a.limit)
        return self.state.history(limit=a.limit)

    async def h_pause(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.PauseArgs, args)
        return await self.traffic.pause(a.timeout, a.actor, a.reason)

    async def h_resume(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.ResumeArgs, args)
        return await self.traffic.resume(a.actor, a.reason)

    async def h_maintenance(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        a = api.decode(api.MaintenanceArgs, args)
        return await self.traffic.maintenance(a.on, a.page, a.retry_after, a.actor, a.reason)

    async def h_metrics(self, args: dict[str, Any], emit: rpc.Emit) -> dict[str, Any]:
        return self.telemetry.live_metrics()
