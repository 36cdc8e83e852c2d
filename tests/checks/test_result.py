"""CheckResult: redaction, JSON round trip, timeouts and failures turned into results."""

from __future__ import annotations

import asyncio

from changeover.checks.result import CheckResult, Failed, Outcome, passed, run_check, summary


def test_secrets_are_redacted_at_construction() -> None:
    r = CheckResult("database", "database", False, 0.1,
                    "cannot connect to postgresql://app:hunter2@db/app?password=x",
                    {"url": "redis://:s3cret@h/0", "api_token": "abc"})
    assert "hunter2" not in r.detail and "password=x" not in r.detail and "***" in r.detail
    assert r.data == {"url": "redis://:***@h/0", "api_token": "***"}


def test_json_round_trip() -> None:
    r = CheckResult("endpoints", "endpoint", True, 0.0123456, "skipped: nothing live", {"n": 1}, skipped=True)
    doc = r.to_json()
    assert doc == {"name": "endpoints", "kind": "endpoint", "ok": True, "duration": 0.0123,
                   "detail": "skipped: nothing live", "skipped": True, "data": {"n": 1}}
    back = CheckResult.from_json(doc)
    assert back.name == r.name and back.skipped and back.data == {"n": 1}


def test_run_check_turns_everything_into_results() -> None:
    async def hangs() -> Outcome:
        await asyncio.sleep(30)
        return passed("never")

    async def fails() -> Outcome:
        raise Failed("nope", {"why": 1})

    async def crashes() -> Outcome:
        raise KeyError("boom")

    async def ok() -> Outcome:
        return passed("fine", n=2)

    async def main() -> list[CheckResult]:
        return list(await asyncio.gather(run_check("a", "service", 0.05, hangs), run_check("b", "service", 5, fails),
                                         run_check("c", "service", 5, crashes), run_check("d", "service", 5, ok)))

    a, b, c, d = asyncio.run(main())
    assert not a.ok and a.detail == "timed out after 0.05s"
    assert not b.ok and b.detail == "nope" and b.data == {"why": 1}
    assert not c.ok and c.detail == "KeyError: 'boom'"
    assert d.ok and d.data == {"n": 2}
    assert summary([a, b, c, d]) == "3 of 4 checks failed: a, b, c"
    assert summary([d]) == "1 check passed"
