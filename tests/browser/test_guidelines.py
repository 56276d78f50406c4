"""Guidelines on the review page: an admin publishes them in the admin view; a reviewer who starts
reviewing is shown them first and reviews once they say they read them; `g` shows them again; the
verdict records the version; the admin view's reviewer table shows the API's figures."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, expect

from feedback import review as rs
from models.pipeline import BuildResult
from tests.browser.test_review_page import Session, current, moved_from, predict
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.browser

MARKDOWN = "# Sevens\n\nA **7** may have a bar across.\n\n- judge the digit, not the pen"


def test_an_admin_publishes_guidelines_and_a_reviewer_reads_them_before_reviewing(
    browser: Browser, start_service: Callable[..., RunningService], trained_model: BuildResult, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, root = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
        _, ann = rs.create_user(conn=conn, name="ann", role=rs.Role.REVIEWER)
    service = start_service(LOOP_REVIEW_OVERLAP_SHARE="0")
    predict(service.url, 6)
    admin, reviewer = Session(browser, service.url, root), Session(browser, service.url, ann)
    try:
        admin.page.get_by_role("button", name="Admin").click()
        expect(admin.page.locator("#guidelines-status")).to_have_text("No guidelines yet.")
        admin.page.get_by_label("Guidelines (Markdown)").fill(MARKDOWN)
        admin.page.get_by_role("button", name="Publish a new version").click()
        expect(admin.page.locator("#guidelines-status")).to_contain_text("version 1 published")

        page = reviewer.page
        page.get_by_role("button", name="Start reviewing").click()
        dialog = page.locator("#guidelines")
        expect(dialog).to_be_visible()
        expect(dialog.locator("h1")).to_have_text("Sevens")  # the Markdown, rendered
        expect(dialog.locator("strong")).to_have_text("7")
        expect(page.locator("#stage")).to_be_hidden()
        reviewer.shot("10-guidelines")
        page.get_by_role("button", name="I have read them").click()
        page.wait_for_selector("#stage:not([hidden])")
        page.keyboard.press("g")
        expect(dialog).to_be_visible()
        expect(page.locator("#guidelines-read")).to_be_hidden()  # read already
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        item = current(page)
        page.keyboard.press("Enter")
        moved_from(page, item)
        with psycopg.connect(database_url) as conn:
            recorded = conn.execute("SELECT prediction_id::text, guidelines_version FROM annotations").fetchall()
        assert recorded == [(item, 1)]

        check_the_reviewer_table(admin, service.url, root)
        assert admin.errors == [] and [e for e in reviewer.errors if "409" not in e] == []
    finally:
        admin.close()
        reviewer.close()


def check_the_reviewer_table(admin: Session, url: str, root: str) -> None:
    """The admin view's reviewer table shows what GET /admin/reviewers says; targets set there flag."""
    admin.page.get_by_role("button", name="Dashboard").click()
    admin.page.get_by_role("button", name="Admin").click()
    expect(admin.page.locator("#reviewers")).to_contain_text("ann")
    figures = httpx.get(f"{url}/admin/reviewers", headers={"Authorization": f"Bearer {root}"}).json()
    (ann_row,) = figures["reviewers"]
    cells = admin.page.locator("#reviewers tr").nth(1).locator("td").all_inner_texts()
    assert cells[:4] == ["ann", "1", "1.0", f"{ann_row['median_seconds']:.1f}"] and cells[-1] == "\u2013"
    expect(admin.page.locator("#reviewer-targets")).to_contain_text("min agreement 0.9")
    admin.page.get_by_label("Verdicts a day ≥").fill("5")
    admin.page.get_by_role("button", name="Set targets").click()
    expect(admin.page.locator("#reviewer-targets")).to_contain_text("min per day 5")
    expect(admin.page.locator("#reviewers tr").nth(1).locator("td").last).to_have_text("per_day")
    stored = httpx.get(f"{url}/admin/reviewers", headers={"Authorization": f"Bearer {root}"}).json()
    assert stored["targets"]["min_per_day"] == 5 and stored["reviewers"][0]["flags"] == ["per_day"]
