"""The gates a deploy passes: checks, migrations, observation. The pipeline calls these in order.

Each gate records itself as a step (or a skipped note when not configured) and stores its check
results with the deployment, so `history --checks` shows exactly what was verified. The gates
also own the daemon's view of traffic: a Recorder mirrored from the proxy worker a few times a
second, which feeds the observer, `status` and the Prometheus endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from changeover.checks.flows import SessionProbe, run_flows
from changeover.checks.http import check_version, run_smoke
from changeover.checks.pre import run_pre
from changeover.checks.result import CheckResult, failures
from changeover.config import Config
from changeover.daemon.probes import make_probes
from changeover.daemon.slots import SlotManager
from changeover.daemon.steps import StepRunner
from changeover.errors import ChangeoverError, CheckFailed, ConfigError, MigrationError
from changeover.monitor import mirror
from changeover.monitor.exposition import ChangeoverCollector, serve_metrics
from changeover.monitor.metrics import Recorder
from changeover.monitor.notify import Notifier
from changeover.monitor.observer import Observer, Probes
from changeover.monitor.triggers import capture_baseline
from changeover.proxy.remote import ProxyProcess
from changeover.state import Release, State

if TYPE_CHECKING:
    from changeover.daemon.pipeline import Active, Pipeline

log = logging.getLogger("changeover.gates")
PULL_INTERVAL = 0.1       # how often the daemon mirrors the proxy's counters
STATUS_WINDOW = 10.0      # seconds of traffic `changeover status` summarises


class Gates:
    def __init__(self, config: Config, state: State, slots: SlotManager) -> None:
        self.config = config
        self.state = state
        self.slots = slots
        self.recorder = Recorder(history=config.monitor.history)
        self.collector = ChangeoverCollector(self.recorder)
        self.notifier = Notifier(config.monitor.notify)
        self.observer: Observer | None = None
        self.proxy: ProxyProcess | None = None
        self.metrics_port: int | None = None
        self._since: int | None = None
        self._puller: asyncio.Task[None] | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._session: SessionProbe | None = None
        self.deployment_id: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        await self.pull()
        self._puller = asyncio.get_running_loop().create_task(self._pull_loop())
        self.collector.set_live(self.state.live_slot())
        self.collector.set_deploy_state("idle")
        addr = self.config.monitor.metrics_address
        if addr is not None:
            try:
                self._metrics_server = await serve_metrics(addr[0], addr[1], self.collector)
            except OSError as e:
                raise ConfigError(f"cannot listen on {self.config.monitor.metrics_listen}: {e.strerror or e}",
                                  file=str(self.config.file), key="monitor.metrics_listen") from None
            sock = self._metrics_server.sockets[0]
            self.metrics_port = int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._puller is not None:
            self._puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._puller
        if self._metrics_server is not None:
            self._metrics_server.close()
        await self.notifier.close()

    def reset_mirror(self) -> None:
        """A new proxy worker counts from zero: read it from the start."""
        self._since = None

    async def pull(self) -> None:
        assert self.proxy is not None
        data = await self.proxy.metrics(self._since)
        self._since = mirror.absorb(self.recorder, data)

    async def _pull_loop(self) -> None:
        while True:
            await asyncio.sleep(PULL_INTERVAL)
            try:
                await self.pull()
            except ChangeoverError as e:
                log.warning("reading the proxy's metrics failed: %s", e)
                await asyncio.sleep(1)

    def live_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: self.recorder.window(s, STATUS_WINDOW).to_dict() for s in self.recorder.slots()}
        if self.observer is not None:
            out["observing"] = self.observer.status()
        if self.metrics_port is not None:
            addr = self.config.monitor.metrics_address
            out["endpoint"] = f"http://{addr[0] if addr else '127.0.0.1'}:{self.metrics_port}/metrics"
        return out

    # -- helpers --------------------------------------------------------------------------------
    def _proxy_url(self) -> str:
        host = self.config.proxy.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        port = self.proxy.port if self.proxy is not None and self.proxy.port else self.config.proxy.port
        return f"http://{host}:{port}"

    def _slot_url(self, slot: str) -> str:
        ups = self.slots.supervisor.upstreams(slot)
        if not ups:
            raise CheckFailed(f"slot {slot} has no running instance")
        host, port = ups[0]
        return f"http://{host}:{port}"

    async def _gate(self, steps: StepRunner, name: str, run: Callable[[], Awaitable[list[CheckResult]]]) -> None:
        """One step running a group of checks: results are stored and shown; any failure fails it."""

        async def go() -> list[CheckResult]:
            results = await run()
            self.state.add_checks(steps.deployment_id, [r.to_json() for r in results])
            for r in results:
                await steps.emit({"type": "check", "name": r.name, "ok": r.ok, "detail": r.detail,
                                  "duration": r.duration})
            bad = failures(results)
            if bad:
                raise CheckFailed("; ".join(f"{r.name}: {r.detail}" for r in bad))
            return results

        def detail(results: list[CheckResult]) -> str:
            skipped = sum(1 for r in results if r.skipped)
            return f"{len(results) - skipped} passed" + (f", {skipped} skipped" if skipped else "")

        await steps.run(name, go, detail=detail)

    # -- before the switch ----------------------------------------------------------------------
    async def pre_deploy(self, steps: StepRunner, release: Release) -> None:
        live = self.state.live_slot()
        live_url = self._proxy_url() if live is not None else None
        await self.notify("deploy_started", {"version": release.version})
        await self._gate(steps, "pre-deploy checks", lambda: run_pre(self.config.checks, release.env, live_url))

    def _migrations_dir(self) -> Path:
        d = Path(self.config.migrations.dir)
        return d if d.is_absolute() else self.config.root / d

    def migrations_enabled(self) -> bool:
        return self.config.migrations.database is not None and self._migrations_dir().is_dir()

    async def migrate_expand(self, steps: StepRunner, release: Release) -> bool:
        if not self.migrations_enabled():
            why = "no database configured" if self.config.migrations.database is None else \
                f"no migrations directory ({self._migrations_dir()})"
            await steps.note("migrations (expand)", why)
            return False
        from changeover.migrations import commands as migrate

        lines: list[str] = []
        loop = asyncio.get_running_loop()

        async def show(msg: str) -> None:
            await steps.emit({"type": "check", "name": "migrate", "ok": True, "detail": msg})

        def progress(msg: str) -> None:  # called from the migration thread
            lines.append(msg)
            asyncio.run_coroutine_threadsafe(show(msg), loop)

        def run() -> Any:
            return migrate.safe(self.config, release=release.version, progress=progress)

        async def go() -> Any:
            try:
                return await asyncio.to_thread(run)
            except MigrationError:
                raise
            except ChangeoverError as e:
                raise MigrationError(str(e)) from None

        def detail(result: Any) -> str:
            text = f"{len(result.applied)} applied"
            if result.stopped_at is not None:
                text += f"; {result.pending} left for later: {result.stopped_at.reason}"
            return text

        result = await steps.run("migrations (expand)", go, detail=detail)
        return bool(result.applied)

    async def verify_private(self, steps: StepRunner, release: Release, target: str, live: str | None,
                             migrated: bool) -> None:
        checks = self.config.checks
        green = self._slot_url(target)

        async def green_checks() -> list[CheckResult]:
            results: list[CheckResult] = []
            if checks.version is not None:
                expected = release.env.get("API_VERSION", release.version)
                path = checks.version.path or self.config.app.health_path
                results.append(await check_version(green, path, checks.version.field, expected,
                                                   checks.version.timeout))
                if not results[-1].ok:
                    return results  # the wrong build: no point testing it further
            results += await run_smoke(checks, green, target=target)
            results += await run_flows(checks, green, target=target)
            return results

        if checks.version is not None or checks.smoke or checks.flows:
            await self._gate(steps, f"verify {target} (private)", green_checks)
        else:
            await steps.note(f"verify {target} (private)", "no version check, smoke tests or flows configured")

        if migrated and live is not None and checks.smoke:
            blue = self._slot_url(live)
            await self._gate(steps, f"old code on new schema ({live})",
                             lambda: run_smoke(checks, blue, target=live))
        self._session = None
        if checks.session is not None and live is not None:
            probe = SessionProbe(checks)
            await self._gate(steps, "session sign-in (live)", lambda: _one(probe.sign_in(self._proxy_url())))
            self._session = probe

    # -- after the switch -----------------------------------------------------------------------
    async def verify_public(self, steps: StepRunner, release: Release, target: str, live: str | None) -> None:
        checks = self.config.checks
        await self.notify("live", {"version": release.version, "slot": target})
        self.collector.set_live(target)
        proxy = self._proxy_url()
        probe = self._session

        async def public() -> list[CheckResult]:
            results: list[CheckResult] = []
            if probe is not None:
                results.append(await probe.verify(proxy))
            results += await run_smoke(checks, proxy, target="proxy")
            results += await run_flows(checks, proxy, target="proxy")
            return results

        if probe is not None or checks.smoke or checks.flows:
            await self._gate(steps, "verify through the proxy", public)

    async def observe(self, steps: StepRunner, release: Release, target: str, live: str | None,
                      active: Active) -> dict[str, Any] | None:
        cfg = self.config.monitor
        if cfg.observe <= 0:
            await steps.note("observe", "observation disabled ([monitor] observe = 0)")
            return None
        if live is None or not self.slots.warm(live):
            await steps.note("observe", "nothing to roll back to (first release or no warm standby)")
            return None
        # Read the proxy's counters now: the slot was just given a new release, and the observer
        # must not judge it on the previous occupant's numbers (e.g. its failure streak).
        await self.pull()
        baseline = capture_baseline(self.recorder, live, cfg.baseline) if live is not None else None
        observer = Observer(cfg, self.recorder, target, baseline, self._probes(release, target))
        self.observer = observer
        manual: dict[str, Any] = {}

        def cancel(reason: str | None = None, actor: str | None = None) -> None:
            manual.update(reason=reason or "manual rollback", actor=actor)
            observer.cancel("manual", {"reason": reason or "manual rollback", "actor": actor})

        active.observer_cancel = cancel
        self.collector.set_deploy_state("observing")

        async def watch() -> dict[str, Any]:
            verdict = await observer.run()
            return verdict.to_dict()

        def detail(v: dict[str, Any]) -> str:
            return f"healthy for {v['elapsed']:.1f}s" if v["ok"] else f"{v['reason']}: {v['message']}"

        try:
            verdict = await steps.run(f"observe {target} ({cfg.observe:g}s)", watch, detail=detail)
        finally:
            self.observer = None
            active.observer_cancel = None
            self.collector.set_deploy_state("idle")
        if verdict["ok"]:
            return verdict
        if manual:
            verdict["manual"] = manual
            verdict["reason"] = manual["reason"]
            return verdict
        refused = self._incompatible_migrations(release.version)
        if refused:
            verdict["refused"] = refused
        verdict["reason"] = f"{verdict['reason']}: {verdict['message']}"
        return verdict

    async def rollback_schema(self, steps: StepRunner, version: str, allow_data_loss: bool) -> None:
        """Undo the migrations `version` applied (the newest ones, all tagged with it), newest first.
        Runs after code is switched back: the old code works on the expanded schema, and works on
        the original one again once this is done."""
        if not self.migrations_enabled():
            await steps.note("schema rollback", "no migrations configured")
            return
        from changeover.migrations import commands as migrate

        st = await asyncio.to_thread(migrate.status, self.config)
        applied = [m for m in st.migrations if m.state in ("applied", "backfilling")]
        mine = 0
        for m in reversed(applied):
            if m.release != version:
                break
            mine += 1
        if mine == 0:
            await steps.note("schema rollback", f"{version} applied no migrations that are still the newest")
            return

        def run() -> Any:
            return migrate.rollback(self.config, steps=mine, allow_data_loss=allow_data_loss)

        await steps.run(f"schema rollback ({mine} migration{'s' if mine > 1 else ''} of {version})",
                        lambda: asyncio.to_thread(run),
                        detail=lambda r: ", ".join(f"{x.version}" for x in getattr(r, "rolled_back", [])) or None)

    def _incompatible_migrations(self, version: str) -> str | None:
        """Auto-rollback switches code only; refuse it when this release changed the schema in a way
        the old code cannot use (contract/unsafe migrations applied under this release)."""
        if not self.migrations_enabled():
            return None
        from changeover.migrations import commands as migrate

        try:
            st = migrate.status(self.config)
        except ChangeoverError as e:
            log.warning("cannot read migration history: %s", e)
            return None
        bad = [f"{m.version}_{m.name} ({m.phase})" for m in st.migrations
               if getattr(m, "release", None) == version and m.phase != "expand" and m.state == "applied"]
        if bad:
            return "this release applied migrations the old code may not work with: " + ", ".join(bad)
        return None

    def _probes(self, release: Release, target: str) -> Probes:
        return make_probes(self.config, self.slots, release, target, self._proxy_url())

    # -- notifications, counters, standby expiry ---------------------------------------------------
    async def notify(self, event: str, payload: dict[str, Any]) -> None:
        try:
            self.notifier.notify(event, payload)
        except Exception:  # a notification must never block a deploy or a rollback
            log.exception("notification %s failed", event)

    def count_rollback(self, reason: str) -> None:
        self.collector.count_rollback(reason.split(":", 1)[0])
        self.collector.set_live(self.state.live_slot())

    def schedule_standby_expiry(self, pipeline: Pipeline, slot: str | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        keep = self.config.monitor.keep_standby
        if slot is None or keep <= 0:
            return
        release_id = self.state.slot(slot).release_id
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._expiry = None
            s = self.state.slot(slot)
            if s.state == "standby" and s.release_id == release_id and pipeline.active is None:
                log.info("slot=%s standby kept %.0fs: retiring it", slot, keep)
                pipeline._spawn(pipeline._retire_quietly(slot, f"standby kept for {keep:g}s"))

        self._expiry = loop.call_later(keep, expire)


async def _one(coro: Awaitable[CheckResult]) -> list[CheckResult]:
    return [await coro]


def _now() -> float:
    return time.monotonic()
