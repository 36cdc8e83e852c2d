"""`changeover check pre|smoke|flows`: run the gates by hand, print a table or JSON.

Mounted by the main CLI as `changeover check`; a failing check raises CheckFailed after the
results are printed, and the main CLI turns that into a message and exit code 1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from changeover import config as config_mod
from changeover.checks.render import print_results
from changeover.checks.result import CheckResult, failures, summary
from changeover.errors import CheckFailed, UsageError

app = typer.Typer(help="Run health checks and verification gates by hand.", no_args_is_help=True,
                  add_completion=False)

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="Config file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results as JSON.")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Base URL to test (default: the proxy).")]
PROBE_TIMEOUT = 0.5  # seconds to decide whether the proxy is listening at all


# The checks themselves (httpx, psycopg, redis) are imported by the command that runs them: the
# main CLI mounts this app for every call, and most calls run no check.


def _proxy_url(cfg: config_mod.Config) -> str:
    from changeover.checks.http import normalize_url

    return normalize_url(cfg.proxy.listen)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _release_env(cfg: config_mod.Config) -> dict[str, str]:
    return config_mod.process_env(config_mod.release_env(cfg, None))


def _finish(results: list[CheckResult], as_json: bool, title: str) -> None:
    print_results(results, Console(), as_json=as_json, title=title)
    if failures(results):
        raise CheckFailed(summary(results))


def _run(coro_fn: Callable[[], Awaitable[list[CheckResult]]]) -> list[CheckResult]:
    async def main() -> list[CheckResult]:
        return await coro_fn()

    return asyncio.run(main())


@app.command()
def pre(config: ConfigOpt = Path(config_mod.DEFAULT_CONFIG), json: JsonOpt = False, url: UrlOpt = None) -> None:
    """Database, Redis, live endpoints, services, data integrity, connection budget."""
    from changeover.checks.pre import run_pre

    cfg = config_mod.load(config)
    live = url
    if live is None and _listening(cfg.proxy.host, cfg.proxy.port):
        live = _proxy_url(cfg)
    env = _release_env(cfg)
    results = _run(lambda: run_pre(cfg.checks, env, live))
    _finish(results, json, "pre-deploy checks")


@app.command()
def smoke(config: ConfigOpt = Path(config_mod.DEFAULT_CONFIG), json: JsonOpt = False, url: UrlOpt = None) -> None:
    """The [[checks.smoke]] requests (and the version check when API_VERSION is set)."""
    from changeover.checks.http import check_version, normalize_url, run_smoke

    cfg = config_mod.load(config)
    base = normalize_url(url) if url else _proxy_url(cfg)
    env = _release_env(cfg)
    expected = env.get("API_VERSION")

    async def all_checks() -> list[CheckResult]:
        results = []
        v = cfg.checks.version
        if v is not None and expected:
            path = v.path or config_mod.require_app(cfg).health_path
            results.append(await check_version(base, path, v.field, expected, v.timeout))
        results.extend(await run_smoke(cfg.checks, base))
        return results

    if not cfg.checks.smoke and cfg.checks.version is None:
        raise UsageError(f"{config}: nothing to run: no [[checks.smoke]] or [checks.version] defined")
    _finish(_run(all_checks), json, f"smoke tests against {base}")


@app.command()
def flows(config: ConfigOpt = Path(config_mod.DEFAULT_CONFIG), json: JsonOpt = False, url: UrlOpt = None) -> None:
    """The [[checks.flow]] user flows, each with its own cookie jar."""
    from changeover.checks.flows import run_flows
    from changeover.checks.http import normalize_url

    cfg = config_mod.load(config)
    if not cfg.checks.flows:
        raise UsageError(f"{config}: nothing to run: no [[checks.flow]] defined")
    base = normalize_url(url) if url else _proxy_url(cfg)
    _finish(_run(lambda: run_flows(cfg.checks, base)), json, f"user flows against {base}")
