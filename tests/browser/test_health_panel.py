"""The model health panel of the review page's dashboard shows what `GET /admin/health` says: each
window's volume, drift alarms and accuracies in the table, the estimate's line and the alarms on the
chart; a reviewer is told it needs an admin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import psycopg
import pytest
from playwright.sync_api import Browser, expect

from feedback import health
from feedback import review as rs
from models.pipeline import BuildResult
from tests.browser.test_review_page import Session
from tests.data.test_health import HeldOut, held_out, send, undrifted  # noqa: F401 (a fixture)
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.browser


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def shown(session: Session) -> list[list[str]]:
    rows = session.page.locator("#health tr").all()
    return [r.locator("td").all_inner_texts() for r in rows[1:]]


def test_the_health_panel_shows_the_windows_the_api_answers(
    browser: Browser,
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    conn: psycopg.Connection,
    held_out: HeldOut,  # noqa: F811
) -> None:
    rng = np.random.default_rng(2)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    x, y = undrifted(rng, held_out, 200)
    send(conn, trained_model, {now - timedelta(hours=3): undrifted(rng, held_out, 200),
                               now - timedelta(hours=2): (np.clip(x + 3, 0, 16), y)})  # fmt: skip
    health.advance_all(conn, config=health.HealthConfig(lookback_s=5 * 3600, delay_s=0))
    _, root = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    _, ann = rs.create_user(conn=conn, name="ann", role=rs.Role.REVIEWER)
    service = start_service()
    found = httpx.get(f"{service.url}/admin/health", params={"hours": 48},
                      headers={"Authorization": f"Bearer {root}"}, timeout=30).json()  # fmt: skip
    windows = list(reversed(found["windows"]))  # the panel shows the newest first
    assert [w["count"] for w in windows] == [200, 200]

    admin, reviewer = Session(browser, service.url, root), Session(browser, service.url, ann)
    try:
        admin.page.get_by_role("button", name="Dashboard").click()
        expect(admin.page.locator("#health")).to_contain_text(trained_model.stored.version)
        rows = shown(admin)
        assert len(rows) == 2
        for row, window in zip(rows, windows, strict=True):
            assert row[1] == window["model_version"] and row[2] == str(window["count"])
            est = window["estimated_accuracy"]
            assert row[5].startswith(f"{est['value'] * 100:.1f}% [{est['low'] * 100:.1f}, ")
            psi = {s["kind"]: f"{s['psi']:.3f}" for s in window["shifts"]}
            assert row[3] == f"{psi['labels']} / {psi['confidence']} / {psi['inputs']}"
        assert "inputs" in rows[0][4] and rows[1][4] == "\u2013"
        assert admin.page.locator("#health-chart polyline[data-series='estimated']").count() == 1
        assert admin.page.locator("#health-chart circle[data-alarm]").count() == 1
        admin.page.locator("#health-window").select_option("24")
        days = {(now - timedelta(hours=h)).date() for h in (2, 3)}
        expect(admin.page.locator("#health tr")).to_have_count(1 + len(days))  # both hours in a day's window
        admin.shot("9-health-panel")

        reviewer.page.get_by_role("button", name="Dashboard").click()
        expect(reviewer.page.locator("#health-only")).to_have_text("Model health needs an admin's token.")
        assert admin.errors == [] and reviewer.errors == []
    finally:
        admin.close()
        reviewer.close()
