"""Pre-deploy checks (`run_pre`) and the critical subset the monitor re-runs (`run_critical`).

Every check runs concurrently with its own timeout; results come back in a fixed order
(database, redis, endpoints, services, integrity, connection budget) so output is stable.
`env` is the release environment: DATABASE_URL and REDIS_URL exactly as the app will get them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial

from changeover.checks.config import ChecksConfig, Integrity, PreConfig, Service
from changeover.checks.http import check_request, normalize_url
from changeover.checks.result import GRACE, CheckResult, Failed, Outcome, passed, run_check, shorten, skipped

SCRATCH_PREFIX = "changeover:check:"
SCRATCH_TTL = 60           # seconds; the key is deleted at once, the TTL covers a crash in between
OUTPUT_TAIL = 300          # characters of a failing command's output kept in the detail


def _url(env: dict[str, str], var: str, mode: str) -> str | None:
    """The URL to check, None to skip; Failed when required but unset."""
    url = env.get(var, "").strip()
    if not url and mode == "required":
        raise Failed(f"{var} is not set in the release env ([env] in changeover.toml)")
    return url or None


def _needs(env: dict[str, str], pre: PreConfig) -> str:
    url = env.get(pre.database_var, "").strip()
    if not url:
        raise Failed(f"needs {pre.database_var}, which is not set in the release env")
    return url


# -- redis -----------------------------------------------------------------------------------

async def redis_roundtrip(url: str, timeout: float) -> Outcome:
    """PING, then SET (with a TTL) / GET / DEL on a scratch key: proves reads and writes work."""
    import redis.asyncio as aioredis  # (here: every `changeover` command imports this module)
    from redis.exceptions import RedisError

    try:
        async with aioredis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout) as client:
            t0 = time.perf_counter()
            await client.ping()
            ping = time.perf_counter() - t0
            key, value = SCRATCH_PREFIX + secrets.token_hex(8), secrets.token_hex(8)
            t1 = time.perf_counter()
            await client.set(key, value, ex=SCRATCH_TTL)
            got = await client.get(key)
            await client.delete(key)
            roundtrip = time.perf_counter() - t1
    except RedisError as e:
        raise Failed(shorten(f"{type(e).__name__}: {e}")) from None
    if got != value.encode():
        raise Failed(f"wrote {key} but read back {got!r}: is this a replica or a proxy dropping writes?")
    return passed(f"PING in {ping * 1000:.1f} ms, SET/GET/DEL in {roundtrip * 1000:.1f} ms",
                  ping_ms=round(ping * 1000, 2), roundtrip_ms=round(roundtrip * 1000, 2))


# -- services --------------------------------------------------------------------------------

async def tcp_reachable(host: str, port: int) -> Outcome:
    t0 = time.perf_counter()
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        raise Failed(f"{host}:{port} unreachable: {e.strerror or e}") from None
    elapsed = time.perf_counter() - t0
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return passed(f"{host}:{port} accepts connections ({elapsed * 1000:.1f} ms)",
                  connect_ms=round(elapsed * 1000, 2))


async def command_succeeds(argv: tuple[str, ...]) -> Outcome:
    """Run without a shell; exit 0 passes. On timeout (cancellation) the process is killed."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except FileNotFoundError:
        raise Failed(f"command not found: {argv[0]}") from None
    except PermissionError:
        raise Failed(f"not executable: {argv[0]}") from None
    except OSError as e:
        raise Failed(f"cannot run {argv[0]}: {e.strerror or e}") from None
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace").strip()
    tail = shorten(text[-OUTPUT_TAIL:], OUTPUT_TAIL) if text else ""
    if proc.returncode != 0:
        raise Failed(f"{argv[0]} exited with {proc.returncode}" + (f": {tail}" if tail else ""),
                     {"exit_code": proc.returncode})
    return passed(f"{argv[0]} exited 0" + (f": {tail}" if tail else ""), exit_code=0)


async def check_service(svc: Service) -> CheckResult:
    def check() -> Awaitable[Outcome]:
        if svc.tcp is not None:
            return tcp_reachable(*svc.tcp)
        return command_succeeds(svc.command or ())

    return await run_check(f"service {svc.name}", "service", svc.timeout, check)


# -- the two entry points ----------------------------------------------------------------------

def _connectivity(mode: str, var: str, env: dict[str, str], probe: Callable[[str], Awaitable[Outcome]]
                  ) -> Callable[[], Awaitable[Outcome]] | None:
    """A database or Redis check: off, or `probe` on the URL in `var` (skipped when auto and unset)."""
    if mode == "off":
        return None

    async def check() -> Outcome:
        url = _url(env, var, mode)
        if url is None:
            return skipped(f"{var} is not set in the release env")
        return await probe(url)

    return check


def _database(pre: PreConfig, env: dict[str, str]) -> Callable[[], Awaitable[Outcome]] | None:
    from changeover.checks import db

    return _connectivity(pre.database, pre.database_var, env, lambda url: db.connectivity(url, pre.timeout))


def _redis(pre: PreConfig, env: dict[str, str]) -> Callable[[], Awaitable[Outcome]] | None:
    return _connectivity(pre.redis, pre.redis_var, env, lambda url: redis_roundtrip(url, pre.timeout))


async def run_pre(cfg: ChecksConfig, env: dict[str, str], live_url: str | None) -> list[CheckResult]:
    """All pre-deploy checks. live_url: the proxy serving the live version, None when nothing is
    live yet (first deploy): the endpoint checks are then reported as skipped."""
    pre = cfg.pre
    jobs: list[Awaitable[CheckResult]] = []
    if (database := _database(pre, env)) is not None:
        jobs.append(run_check("database", "database", pre.timeout, database))
    if (red := _redis(pre, env)) is not None:
        jobs.append(run_check("redis", "redis", pre.timeout, red))
    if pre.endpoints and live_url is None:
        jobs.append(run_check("endpoints", "endpoint", pre.timeout,
                              lambda: _skip("nothing is live yet, no endpoints to check")))
    elif live_url is not None:
        base = normalize_url(live_url)
        jobs.extend(check_request(base, ep, "endpoint") for ep in pre.endpoints)
    jobs.extend(check_service(s) for s in pre.services)
    for c in pre.integrity:
        job = partial(_integrity, env, pre, c)
        # the statement timeout fires first, with a clearer message than the hard limit
        jobs.append(run_check(f"integrity {c.name}", "integrity", c.timeout + GRACE, job))
    if (b := pre.connections) is not None:
        from changeover.checks import db

        jobs.append(run_check("connection budget", "budget", b.timeout,
                              lambda: db.budget(_needs(env, pre), b)))
    return list(await asyncio.gather(*jobs))


async def _integrity(env: dict[str, str], pre: PreConfig, c: Integrity) -> Outcome:
    from changeover.checks import db

    return await db.integrity(_needs(env, pre), c)


async def _skip(why: str) -> Outcome:
    return skipped(why)


async def run_critical(cfg: ChecksConfig, env: dict[str, str]) -> list[CheckResult]:
    """What the monitor re-runs on an interval after the switch: database and Redis connectivity
    (when checked at all) and every service marked `critical = true`."""
    pre = cfg.pre
    jobs: list[Awaitable[CheckResult]] = []
    if (database := _database(pre, env)) is not None:
        jobs.append(run_check("database", "database", pre.timeout, database))
    if (red := _redis(pre, env)) is not None:
        jobs.append(run_check("redis", "redis", pre.timeout, red))
    jobs.extend(check_service(s) for s in pre.services if s.critical)
    return list(await asyncio.gather(*jobs))
