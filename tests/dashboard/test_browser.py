"""The dashboard in real headless Chromium, against a real daemon with the example app under
keep-alive load: log in with the token, watch a deploy's steps appear, roll back with a click and
see the live slot flip with no failed request; a release rolled back automatically shows its
evidence without a reload; redeploy, promote and stop the standby from the pages.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import Background, Site, screenshot

pytestmark = pytest.mark.timeout(180)
T = 30_000   # ms: what a slow, shared machine may need for a page to show a change


def deploy_in_background(site: Site, version: str) -> threading.Thread:
    t = threading.Thread(target=site.project.deploy, args=(version,), kwargs={"check": False}, daemon=True)
    t.start()
    return t


def test_the_dashboard_in_a_browser(site: Site, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    page.goto(site.login_url())                      # the token travels in the fragment, JS posts it
    expect(page).to_have_url(site.base + "/", timeout=T)
    expect(page.locator("#live-version")).to_have_text("v1", timeout=T)
    expect(page.locator("#header-live")).to_contain_text("v1 on blue")
    page.evaluate("window.__noReload = 1")           # gone if the page were ever reloaded

    with Background(site.project.port) as load:
        # A deploy started elsewhere (the CLI) shows up step by step.
        deployer = deploy_in_background(site, "v2")
        expect(page.locator("#latest .step[data-kind='start']")).to_be_visible(timeout=T)
        expect(page.locator("#latest .step[data-kind='switch'][data-state='ok']")).to_be_visible(timeout=T)
        expect(page.locator("#live-version")).to_have_text("v2", timeout=T)
        expect(page.locator("#observing")).to_be_visible(timeout=T)
        deployer.join(60)
        screenshot(page, "now", tmp_path)

        # One click, a confirmation that says exactly what will happen, and the slot flips back.
        page.click("#btn-rollback")
        expect(page.locator("#confirm-text")).to_contain_text("switch back to v1 on blue, warm: about", timeout=T,
                                                              ignore_case=True)
        page.fill("#confirm-reason", "checkout totals look wrong")
        screenshot(page, "confirm-rollback", tmp_path, full=False)
        page.click("#confirm-ok")
        expect(page.locator("#live-version")).to_have_text("v1", timeout=T)
        expect(page.locator("#live .slotname")).to_have_text("blue")
        expect(page.locator("#runs .run").first).to_have_attribute("data-state", "ok", timeout=T)
        expect(page.locator("#latest .reason")).to_contain_text("checkout totals look wrong", timeout=T)
    assert load.failed == 0, (load.summary(), load.errors[-5:])
    assert load.versions["v1"] > 0 and load.versions["v2"] > 0, load.summary()
    manual = site.history()[0]
    assert manual["state"] == "rolled_back" and "checkout totals look wrong" in (manual["reason"] or "")

    # A release that fails under traffic is rolled back by the daemon; its evidence appears live.
    with Background(site.project.port) as load:
        deployer = deploy_in_background(site, "v3")
        expect(page.locator("#live-version")).to_have_text("v3", timeout=T)
        site.fault.write_text(json.dumps({"error_rate": 1.0, "only_version": "v3"}))
        try:
            expect(page.locator("#latest .evidence")).to_be_visible(timeout=T)
            expect(page.locator("#live-version")).to_have_text("v1", timeout=T)
        finally:
            site.fault.write_text("{}")
        deployer.join(60)
    expect(page.locator("#latest .evidence h4")).to_contain_text("rolled back")
    expect(page.locator("#latest [data-state='rolled_back']")).to_have_count(1)
    assert page.evaluate("window.__noReload") == 1
    assert load.failed_versions.get("v1", 0) == 0 and load.failed_versions.get("proxy", 0) == 0, load.summary()
    screenshot(page, "now-auto-rollback", tmp_path)

    # Traffic: both slots charted, the switches marked.
    page.click("#nav-traffic")
    expect(page.locator("#chart-rps canvas")).to_have_count(1, timeout=T)
    expect(page.locator("#chart-latency canvas")).to_have_count(1)
    assert int(page.locator("#chart-rps").get_attribute("data-switches") or 0) >= 4
    expect(page.locator("#chart-rps .u-legend")).to_contain_text("green")
    screenshot(page, "traffic", tmp_path)

    # History: the automatic rollback with its trigger and numbers; redeploy an earlier release.
    page.click("#nav-history")
    auto = site.history()[0]
    page.click(f"#history-{auto['id']} summary")
    evidence = page.locator(f"#history-{auto['id']} .evidence")
    expect(evidence).to_contain_text("requests")
    screenshot(page, "history", tmp_path)
    page.click("#btn-redeploy-v2")
    expect(page.locator("#confirm-text")).to_contain_text("Deploy v2 again from", timeout=T)
    page.click("#confirm-ok")
    expect(page.locator("#header-live")).to_contain_text("v2 on green", timeout=T)

    # Promote ends v2's window; then the standby is stopped.
    page.click("#nav-now")
    page.click("#btn-promote", timeout=T)
    expect(page.locator("#confirm-text")).to_contain_text("End the observation window of v2 now", timeout=T)
    page.click("#confirm-ok")
    expect(page.locator("#observing")).to_have_count(0, timeout=T)
    expect(page.locator("#latest .state.succeeded")).to_be_visible(timeout=T)
    page.click("#btn-stop-standby", timeout=T)
    expect(page.locator("#confirm-text")).to_contain_text("Drain and stop v1 on blue", timeout=T)
    page.click("#confirm-ok")
    expect(page.locator("#standby-version")).to_have_count(0, timeout=T)
    assert site.project.status()["standby"] is None

    page.click("#nav-migrations")
    expect(page.locator("#migrations-status")).to_contain_text("0002")
    expect(page.locator("#plan-0002")).to_contain_text("ACCESS EXCLUSIVE")
    screenshot(page, "migrations", tmp_path)
    ctx.close()
