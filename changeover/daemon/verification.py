"""What a release must pass: pre-deploy checks, expand migrations, private and public verification.

Each gate is one step of the deployment (or a skipped note when not configured) and stores its
check results with the deployment, so `history --checks` shows exactly what was verified. Every
call takes the config the current deploy read, and every database URL comes from the release's
environment, so checks, probes and migrations talk to the same database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
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
from changeover.state_schema import Release

log = logging.getLogger("changeover.verify")


def database_url(config: Config, release: Release) -> str | None:
    """The database a release's migrations run on: its own DATABASE_URL (`deploy --env
    DATABASE_URL=…` migrates the database it checks), else [migrations] database."""
    return release.env.get(config.checks.pre.database_var) or config.migrations.database


def migrations_enabled(config: Config, release: Release) -> bool:
    """A configured migrations directory that does not exist is an error, not "skip"."""
    from changeover.migrations import commands as migrate

    return migrate.enabled(config, release.path, database_url(config, release))


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
        from changeover.migrations import commands as migrate

        url = database_url(config, release)
        try:
            enabled = migrations_enabled(config, release)
        except ChangeoverError as e:
            await steps.run(StepKind.MIGRATE, "migrations (expand)", _raise(MigrationError(str(e))))
            return False
        if not enabled:
            why = "no database configured" if url is None else "no migrations directory"
            await steps.note("migrations (expand)", why)
            return False

        loop = asyncio.get_running_loop()

        async def show(msg: str) -> None:
            await steps.emit({"type": "check", "name": "migrate", "ok": True, "detail": msg})

        def progress(msg: str) -> None:  # called from the migration thread
            asyncio.run_coroutine_threadsafe(show(msg), loop)

        def run() -> Any:
            # An unsafe pending migration fails the deploy here, with its finding and recipe; a
            # contract one lets it go on (it runs once the old code is gone).
            return migrate.safe(config, release=release.version, progress=progress, release_dir=release.path,
                                database_url=url, refuse_unsafe=True)

        async def go() -> Any:
            try:
                return await asyncio.to_thread(run)
            except MigrationError:
                raise
            except ChangeoverError as e:
                raise MigrationError(str(e)) from None

        def detail(result: Any) -> str:
            text = f"{len(result.applied)} applied"
            if result.contract_pending:
                text += f"; contract pending: {', '.join(result.contract_pending)}"
            elif result.stopped_at is not None:
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
        version = release.version
        url = database_url(config, release)
        if not migrations_enabled(config, release):
            await steps.note("schema rollback", "no migrations configured")
            return
        from changeover.migrations import commands as migrate

        st = await asyncio.to_thread(partial(migrate.status, config, release_dir=release.path, database_url=url))
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
            # `leaving`: this release is being rolled back away from, so its own migrations are not
            # "needed by a running release" even while it is still the standby.
            return migrate.rollback(config, steps=mine, allow_data_loss=allow_data_loss, leaving=version,
                                    release_dir=release.path, database_url=url)

        await steps.run(StepKind.SCHEMA_ROLLBACK,
                        f"schema rollback ({mine} migration{'s' if mine > 1 else ''} of {version})",
                        lambda: asyncio.to_thread(run),
                        detail=lambda r: ", ".join(f"{x.version}" for x in getattr(r, "rolled_back", [])) or None)

    def incompatible_migrations(self, config: Config, release: Release) -> str | None:
        """Auto-rollback switches code only; refuse it when this release changed the schema in a way
        the old code cannot use (contract/unsafe migrations applied under this release)."""
        from changeover.migrations import commands as migrate

        try:
            if not migrations_enabled(config, release):
                return None
            st = migrate.status(config, release_dir=release.path, database_url=database_url(config, release))
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


def _raise(e: ChangeoverError) -> Callable[[], Awaitable[None]]:
    async def go() -> None:
        raise e

    return go
