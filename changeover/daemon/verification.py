"""What a release must pass: pre-deploy checks, expand migrations, private and public verification.

Each gate is one step of the deployment (or a skipped note when not configured) and stores its
check results with the deployment, so `history --checks` shows exactly what was verified. Every
call takes the config the current deploy read, and every database URL comes from the release's
environment, so checks, probes and migrations talk to the same database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from changeover.checks.flows import SessionProbe, run_flows
from changeover.checks.http import check_version, run_smoke
from changeover.checks.pre import run_pre
from changeover.checks.result import CheckResult, failures
from changeover.config import Config, require_app
from changeover.daemon.model import StepKind
from changeover.daemon.slots import SlotManager
from changeover.daemon.steps import StepRunner
from changeover.errors import ChangeoverError, CheckFailed, MigrationError
from changeover.state import Release

log = logging.getLogger("changeover.verify")


def release_config(config: Config, release: Release) -> Config:
    """The config as this release's steps see it: the migrations' database is the release's own
    DATABASE_URL (`deploy --env DATABASE_URL=…` migrates the database it checks)."""
    url = release.env.get(config.checks.pre.database_var)
    if url and url != config.migrations.database:
        return dataclasses.replace(config, migrations=dataclasses.replace(config.migrations, database=url))
    return config


def migrations_dir(config: Config, release: Release | None = None) -> Path:
    raw = config.migrations.dir
    if "{release}" in raw:
        if release is None:
            return Path(raw.replace("{release}", ""))
        raw = raw.replace("{release}", release.path)
    d = Path(raw)
    return d if d.is_absolute() else config.root / d


def migrations_enabled(config: Config, release: Release | None = None) -> bool:
    return config.migrations.database is not None and migrations_dir(config, release).is_dir()


class Verification:
    def __init__(self, slots: SlotManager, proxy_url: Callable[[], str]) -> None:
        self.slots = slots
        self.proxy_url = proxy_url

    def _slot_url(self, slot: str) -> str:
        ups = self.slots.supervisor.upstreams(slot)
        if not ups:
            raise CheckFailed(f"slot {slot} has no running instance")
        host, port = ups[0]
        return f"http://{host}:{port}"

    async def _gate(self, steps: StepRunner, kind: StepKind, name: str,
                    run: Callable[[], Awaitable[list[CheckResult]]]) -> None:
        """One step running a group of checks: results are stored and shown; any failure fails it."""

        async def go() -> list[CheckResult]:
            results = await run()
            steps.state.add_checks(steps.deployment_id, [r.to_json() for r in results])
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

        await steps.run(kind, name, go, detail=detail)

    # -- before the switch ----------------------------------------------------------------------
    async def pre_deploy(self, steps: StepRunner, config: Config, release: Release, live: str | None) -> None:
        live_url = self.proxy_url() if live is not None else None
        await self._gate(steps, StepKind.PRE_CHECKS, "pre-deploy checks",
                         lambda: run_pre(config.checks, release.env, live_url))

    async def migrate_expand(self, steps: StepRunner, config: Config, release: Release) -> bool:
        config = release_config(config, release)
        if not migrations_enabled(config, release):
            why = "no database configured" if config.migrations.database is None else \
                f"no migrations directory ({migrations_dir(config, release)})"
            await steps.note("migrations (expand)", why)
            return False
        from changeover.migrations import commands as migrate

        loop = asyncio.get_running_loop()

        async def show(msg: str) -> None:
            await steps.emit({"type": "check", "name": "migrate", "ok": True, "detail": msg})

        def progress(msg: str) -> None:  # called from the migration thread
            asyncio.run_coroutine_threadsafe(show(msg), loop)

        def run() -> Any:
            kwargs: dict[str, Any] = {"release": release.version, "progress": progress}
            try:
                return migrate.safe(config, **kwargs, release_dir=Path(release.path), refuse_unsafe=True)
            except TypeError:  # an engine without release directories or the refusal (older API)
                return migrate.safe(config, **kwargs)

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

        result = await steps.run(StepKind.MIGRATE, "migrations (expand)", go, detail=detail)
        return bool(result.applied)

    async def verify_private(self, steps: StepRunner, config: Config, release: Release, target: str,
                             live: str | None, migrated: bool) -> SessionProbe | None:
        """Version, smoke tests and flows against the new slot directly; the live release's smoke
        tests on the new schema; a session signed in through the proxy (checked after the switch)."""
        checks = config.checks
        green = self._slot_url(target)

        async def green_checks() -> list[CheckResult]:
            results: list[CheckResult] = []
            if checks.version is not None:
                expected = release.env.get("API_VERSION", release.version)
                path = checks.version.path or require_app(config).health_path
                results.append(await check_version(green, path, checks.version.field, expected,
                                                   checks.version.timeout))
                if not results[-1].ok:
                    return results  # the wrong build: no point testing it further
            results += await run_smoke(checks, green, target=target)
            results += await run_flows(checks, green, target=target)
            return results

        if checks.version is not None or checks.smoke or checks.flows:
            await self._gate(steps, StepKind.VERIFY_PRIVATE, f"verify {target} (private)", green_checks)
        else:
            await steps.note(f"verify {target} (private)", "no version check, smoke tests or flows configured")

        if migrated and live is not None and checks.smoke and self.slots.warm(live):
            blue = self._slot_url(live)
            await self._gate(steps, StepKind.OLD_ON_NEW, f"old code on new schema ({live})",
                             lambda: run_smoke(checks, blue, target=live))
        if checks.session is not None and live is not None and self.slots.warm(live):
            probe = SessionProbe(checks)
            await self._gate(steps, StepKind.SESSION, "session sign-in (live)",
                             lambda: _one(probe.sign_in(self.proxy_url())))
            return probe
        return None

    # -- after the switch -----------------------------------------------------------------------
    async def verify_public(self, steps: StepRunner, config: Config, session: SessionProbe | None) -> None:
        checks = config.checks
        proxy = self.proxy_url()

        async def public() -> list[CheckResult]:
            results: list[CheckResult] = []
            if session is not None:
                results.append(await session.verify(proxy))
            results += await run_smoke(checks, proxy, target="proxy")
            results += await run_flows(checks, proxy, target="proxy")
            return results

        if session is not None or checks.smoke or checks.flows:
            await self._gate(steps, StepKind.VERIFY_PUBLIC, "verify through the proxy", public)

    # -- schema ---------------------------------------------------------------------------------
    async def rollback_schema(self, steps: StepRunner, config: Config, release: Release,
                              allow_data_loss: bool) -> None:
        """Undo the migrations `release` applied (the newest ones, all tagged with it), newest first.
        Runs after code is switched back: the old code works on the expanded schema, and works on
        the original one again once this is done."""
        config = release_config(config, release)
        version = release.version
        if not migrations_enabled(config, release):
            await steps.note("schema rollback", "no migrations configured")
            return
        from changeover.migrations import commands as migrate

        st = await asyncio.to_thread(migrate.status, config)
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
            try:
                return migrate.rollback(config, steps=mine, allow_data_loss=allow_data_loss, force=True)
            except TypeError:  # an engine without release protection (older API)
                return migrate.rollback(config, steps=mine, allow_data_loss=allow_data_loss)

        await steps.run(StepKind.SCHEMA_ROLLBACK,
                        f"schema rollback ({mine} migration{'s' if mine > 1 else ''} of {version})",
                        lambda: asyncio.to_thread(run),
                        detail=lambda r: ", ".join(f"{x.version}" for x in getattr(r, "rolled_back", [])) or None)

    def incompatible_migrations(self, config: Config, release: Release) -> str | None:
        """Auto-rollback switches code only; refuse it when this release changed the schema in a way
        the old code cannot use (contract/unsafe migrations applied under this release)."""
        config = release_config(config, release)
        if not migrations_enabled(config, release):
            return None
        from changeover.migrations import commands as migrate

        try:
            st = migrate.status(config)
        except ChangeoverError as e:
            log.warning("cannot read migration history: %s", e)
            return None
        bad = [f"{m.version}_{m.name} ({m.phase})" for m in st.migrations
               if getattr(m, "release", None) == release.version and m.phase != "expand" and m.state == "applied"]
        if bad:
            return "this release applied migrations the old code may not work with: " + ", ".join(bad)
        return None


async def _one(coro: Awaitable[CheckResult]) -> list[CheckResult]:
    return [await coro]
