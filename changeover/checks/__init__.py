"""Health checks and verification gates: pre-deploy, smoke, flows, integrity; structured results.

The API the deploy pipeline and the monitor call:

    run_pre(cfg, env, live_url) -> list[CheckResult]       before anything changes
    check_version(base_url, health_path, field, expected)   green reports the release's version
    run_smoke(cfg, base_url) / run_flows(cfg, base_url)     green directly, blue, then the proxy
    verify_target(cfg, base_url, health_path=..., expected_version=..., target=...)  all three
    SessionProbe(cfg).sign_in(proxy_url) / .verify(proxy_url)  session continuity across the switch
    run_critical(cfg, env)                                  re-run by the monitor after the switch
    print_results / results_json / summary / failures       showing and storing results

Imported lazily: changeover.config imports changeover.checks.config on every CLI command, and
that must not pay for psycopg, redis and httpx (~140 ms) when no check runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from changeover.checks.config import ChecksConfig
    from changeover.checks.flows import SessionProbe, run_flow, run_flows
    from changeover.checks.http import check_version, run_smoke
    from changeover.checks.pre import run_critical, run_pre
    from changeover.checks.render import print_results, results_doc, results_json, results_table
    from changeover.checks.result import CheckResult, failures, summary
    from changeover.checks.verify import verify_target

_EXPORTS = {
    "ChecksConfig": "config", "SessionProbe": "flows", "run_flow": "flows", "run_flows": "flows",
    "check_version": "http", "run_smoke": "http", "run_critical": "pre", "run_pre": "pre",
    "print_results": "render", "results_doc": "render", "results_json": "render", "results_table": "render",
    "CheckResult": "result", "failures": "result", "summary": "result", "verify_target": "verify",
}

__all__ = [
    "CheckResult",
    "ChecksConfig",
    "SessionProbe",
    "check_version",
    "failures",
    "print_results",
    "results_doc",
    "results_json",
    "results_table",
    "run_critical",
    "run_flow",
    "run_flows",
    "run_pre",
    "run_smoke",
    "summary",
    "verify_target",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'changeover.checks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"changeover.checks.{module}"), name)
