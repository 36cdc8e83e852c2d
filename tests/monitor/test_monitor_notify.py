"""Notifier against real HTTP receivers on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from changeover.monitor.config import EVENTS, NotifyConfig, Webhook
from changeover.monitor.notify import Notifier, safe_url, slack_text
from tests.monitor.receiver import Receiver

PAYLOAD = {"app": "shop", "version": "v2", "previous": "v1", "reason": "error_rate",
           "message": "error rate 100.0% (40/40 in 0.8s) above 5.0%", "evidence": {"errors": 40}}


def cfg(*hooks: Webhook, retries: int = 3, backoff: float = 0.01, timeout: float = 2.0) -> NotifyConfig:
    return NotifyConfig(webhooks=hooks, retries=retries, backoff=backoff, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_json_webhook_delivers_event_and_payload() -> None:
    async def main() -> None:
        rx = await Receiver().start()
        n = Notifier(cfg(Webhook(rx.url + "/hook", headers=(("Authorization", "Bearer t0k"),))))
        n.notify("rolled_back", PAYLOAD)
        await n.close()
        await rx.close()
        (got,) = rx.got
        assert got.path == "/hook" and got.headers["content-type"] == "application/json"
        assert got.headers["authorization"] == "Bearer t0k"
        body = got.json()
        assert body["event"] == "rolled_back" and body["version"] == "v2"
        assert body["evidence"] == {"errors": 40} and body["time"].endswith("+00:00")
        assert (n.delivered, n.failed) == (1, 0)

    asyncio.run(main())


def test_slack_format_is_a_text_message() -> None:
    async def main() -> None:
        rx = await Receiver().start()
        n = Notifier(cfg(Webhook(rx.url, format="slack")))
        n.notify("rolled_back", PAYLOAD)
        n.notify("deploy_started", {"app": "shop", "version": "v3"})
        await n.close()
        await rx.close()
        texts = sorted(r.json()["text"] for r in rx.got)
        assert all(set(r.json()) == {"text"} for r in rx.got)
        assert texts[0].startswith("*shop*: v2 ROLLED BACK (traffic on v1)")
        assert "reason: error_rate" in texts[0]
        assert texts[1] == "*shop*: v3 deploy started"

    asyncio.run(main())


def test_retries_with_backoff_until_the_receiver_recovers() -> None:
    async def main() -> None:
        rx = await Receiver(statuses=[503, 500, 200]).start()
        n = Notifier(cfg(Webhook(rx.url), backoff=0.05))
        t0 = time.monotonic()
        n.notify("live", {"version": "v2"})
        await n.flush(5)
        took = time.monotonic() - t0
        await n.close()
        await rx.close()
        assert rx.attempts == 3 and len(rx.got) == 1
        assert took >= 0.05 + 0.1                # 50 ms, then 100 ms: exponential
        assert (n.delivered, n.failed) == (1, 0)

    asyncio.run(main())


def test_receiver_down_never_blocks_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/services/T000/B000/SECRETTOKEN"

    async def main() -> None:
        n = Notifier(cfg(Webhook(url), retries=2))
        for event in EVENTS:
            n.notify(event, PAYLOAD)
        # notify() only schedules: nothing was attempted yet, whatever the receiver does.
        assert n.pending == len(EVENTS) and (n.delivered, n.failed) == (0, 0)
        await n.close(timeout=5)
        assert n.failed == len(EVENTS) and n.delivered == 0

    with caplog.at_level(logging.INFO, logger="changeover.notify"):
        asyncio.run(main())
    assert "failed after 3 attempt(s)" in caplog.text
    assert "SECRETTOKEN" not in caplog.text and safe_url(url) in caplog.text


def test_client_errors_are_not_retried() -> None:
    async def main() -> None:
        rx = await Receiver(statuses=[400]).start()
        n = Notifier(cfg(Webhook(rx.url)))
        n.notify("live", {})
        await n.close()
        await rx.close()
        assert rx.attempts == 1 and n.failed == 1

    asyncio.run(main())


def test_events_filter_and_unknown_events() -> None:
    async def main() -> None:
        rx_all, rx_rb = await Receiver().start(), await Receiver().start()
        n = Notifier(cfg(Webhook(rx_all.url), Webhook(rx_rb.url, events=frozenset({"rolled_back"}))))
        n.notify("live", {})
        n.notify("rolled_back", {})
        n.notify("exploded", {})                 # not an event: logged, dropped
        await n.close()
        await rx_all.close()
        await rx_rb.close()
        assert sorted(r.json()["event"] for r in rx_all.got) == ["live", "rolled_back"]
        assert [r.json()["event"] for r in rx_rb.got] == ["rolled_back"]

    asyncio.run(main())


def test_close_abandons_a_stalled_receiver_in_time() -> None:
    async def main() -> None:
        rx = await Receiver(stall=True).start()
        n = Notifier(cfg(Webhook(rx.url), timeout=30))
        n.notify("finalised", {})
        t0 = time.monotonic()
        await n.close(timeout=0.2)
        assert time.monotonic() - t0 < 1.0 and n.pending == 0
        await rx.close()

    asyncio.run(main())


def test_no_loop_no_hooks_and_bad_payload_are_harmless() -> None:
    Notifier(cfg(Webhook("http://127.0.0.1:9/"))).notify("live", {})   # no running loop
    Notifier(cfg()).notify("live", {})

    async def main() -> None:
        rx = await Receiver().start()
        n = Notifier(cfg(Webhook(rx.url)))
        n.notify("live", {"when": object()})     # not JSON: sent as its str(), never raised
        await n.close()
        await rx.close()
        assert "object object" in rx.got[0].json()["when"]

    asyncio.run(main())


def test_slack_text_for_refused_rollback() -> None:
    text = slack_text("rollback_refused", {"version": "v2", "previous": "v1", "reason": "drop column"})
    assert "automatic rollback REFUSED (still on v2)" in text and "reason: drop column" in text
