"""One call for "is this target good?": version, then smoke tests and flows.

The pipeline runs it on green before the switch (target="green"), on blue after the expand
migrations (compatibility: smoke only, the old build reports the old version) and through the
proxy after the switch. The version goes first: on a wrong build the smoke results are noise.
"""

from __future__ import annotations

import asyncio

from changeover.checks.config import ChecksConfig
from changeover.checks.flows import run_flows
from changeover.checks.http import check_version, labelled, run_smoke
from changeover.checks.result import CheckResult


async def verify_target(cfg: ChecksConfig, base_url: str, *, health_path: str,
                        expected_version: str | None = None, target: str | None = None,
                        flows: bool = True) -> list[CheckResult]:
    """[checks.version] (when configured and expected_version is given), then [[checks.smoke]] and,
    when flows is true, [[checks.flow]] concurrently. Returns early when the version is wrong."""
    results: list[CheckResult] = []
    v = cfg.version
    if v is not None and expected_version is not None:
        r = await check_version(base_url, v.path or health_path, v.field, expected_version, v.timeout)
        if target:
            r = CheckResult(name=labelled(r.name, target), kind=r.kind, ok=r.ok, duration=r.duration,
                            detail=r.detail, data=r.data, skipped=r.skipped)
        results.append(r)
        if not r.ok:
            return results
    smoke, flow = await asyncio.gather(
        run_smoke(cfg, base_url, target=target),
        run_flows(cfg, base_url, target=target) if flows else _none())
    return results + smoke + flow


async def _none() -> list[CheckResult]:
    return []
