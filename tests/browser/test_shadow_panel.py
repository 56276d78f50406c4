"""A shadow through the review page: an admin starts it in the admin view, reviewers judge where it
disagrees with the answers by keyboard without being told whose label they see, and the panel shows
the figures that the API returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, expect

from feedback import review as rs
from models import digits
from models.pipeline import BuildResult
from tests.browser.test_review_page import Session, current, moved_from, wait_for
from tests.integration.conftest import RunningService
from tests.integration.test_hot_reload import two_versions

pytestmark = pytest.mark.browser

JUDGED = 10


def shadowed_count(http: httpx.Client, admin: dict[str, str]) -> int:
    evidence = http.get("/admin/shadow", headers=admin).json()["evidence"]
    return 0 if evidence is None else int(evidence["shadowed"])


def start_in_the_admin_view(admin: Session, name: str, version: str) -> None:
    admin.page.get_by_role("button", name="Admin").click()
    expect(admin.page.locator("#shadow-status")).to_contain_text("No shadow has run")
    start = admin.page.locator("#shadow-form")
    start.get_by_label("Version").fill(version)
    start.get_by_label("Share").fill("1")
    start.get_by_role("button", name="Start shadow").click()
    expect(admin.page.locator("#shadow-status")).to_contain_text(f"{name}:{version} shadows 100.0%")


def predict_while_shadowed(http: httpx.Client, admin: dict[str, str]) -> dict[str, str]:
    """Digits sent until the worker has loaded the shadow (on the announcement), then 2 x JUDGED
    more, all shadowed and stored; their true labels by prediction id."""
    data, truth = digits.load(), {}

    def predict(row: int) -> None:
        answer = http.post("/predict", json={"samples": [data.images[row].tolist()]}).json()["predictions"][0]
        truth[answer["id"]] = digits.CLASS_NAMES[int(data.labels[row])]

    row = 0
    while shadowed_count(http, admin) == 0:
        predict(row)
        row += 1
        assert row < 200, "the shadow saw nothing"
    for more in range(row, row + 2 * JUDGED):
        predict(more)
    wait_for(lambda: shadowed_count(http, admin) == len(truth), "every answer shadowed and stored", 60)
    return truth


def judge_blind(reviewer: Session, truth: dict[str, str]) -> None:
    """Judge JUDGED items in the disagree order, one key each, never told whose label is shown."""
    page = reviewer.page
    page.locator("#strategy").select_option("disagree")
    page.get_by_role("button", name="Start reviewing").click()
    page.wait_for_selector("#stage:not([hidden])")
    for _ in range(JUDGED):
        item, said = current(page), page.locator("#model-label").inner_text()
        assert "(blind)" in page.locator("#meta").inner_text()
        page.keyboard.press("Enter" if said == truth[item] else truth[item])
        moved_from(page, item)
    reviewer.shot("7-blind-review")


def panel_rows(admin: Session) -> dict[str, list[str]]:
    """The evidence table as shown: {figure: [the answers' cell, the shadow's]}."""
    rows = (r.locator("td").all_inner_texts() for r in admin.page.locator("#shadow-evidence tr").all())
    return {cells[0]: cells[1:] for cells in rows if cells}


def test_an_admin_starts_a_shadow_reviewers_judge_it_blind_and_the_panel_shows_the_evidence(
    browser: Browser,
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    database_url: str,
    tmp_path: Path,
) -> None:
    # The candidate is unsure of everything, so mostly wrong.
    champion, candidate = two_versions(trained_model.stored, tmp_path, database_url, "shadowed")
    name = champion.name
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, ann = rs.create_user(conn=conn, name="ann", role=rs.Role.REVIEWER)
        _, root = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    # One review settles an item (none asks for a second reviewer).
    service = start_service(LOOP_MODEL_NAME=name, LOOP_MODEL_TAG="champion", LOOP_REVIEW_OVERLAP_SHARE="0")
    http = httpx.Client(base_url=service.url, timeout=30)
    as_root = {"Authorization": f"Bearer {root}"}

    admin = Session(browser, service.url, root)
    reviewer: Session | None = None
    try:
        start_in_the_admin_view(admin, name, candidate.version)

        truth = predict_while_shadowed(http, as_root)

        reviewer = Session(browser, service.url, ann)
        judge_blind(reviewer, truth)

        def judged() -> int:
            return int(http.get("/admin/shadow", headers=as_root).json()["evidence"]["judged"])

        wait_for(lambda: judged() == JUDGED, f"{JUDGED} judged shadowed items", 30)
        admin.page.get_by_role("button", name="Dashboard").click()
        admin.page.get_by_role("button", name="Admin").click()
        expect(admin.page.locator("#shadow-evidence")).to_contain_text(f"{JUDGED}")
        evidence = http.get("/admin/shadow", headers=as_root).json()["evidence"]
        rows = panel_rows(admin)
        assert rows["items shadowed"][0] == str(evidence["shadowed"]) == str(len(truth))
        assert rows["items judged"][0] == str(JUDGED)
        champion_cell, shadow_cell = rows["accuracy on judged items"]
        assert f"({evidence['champion']['correct']}/{JUDGED};" in champion_cell
        assert f"({evidence['shadow']['correct']}/{JUDGED};" in shadow_cell
        assert rows["right where the other was wrong"] == [
            str(evidence["only_champion_right"]), str(evidence["only_shadow_right"])]  # fmt: skip
        assert rows["McNemar's exact p"][0] == f"{evidence['p_value']:.4f}"
        assert evidence["only_champion_right"] > evidence["only_shadow_right"]  # the unsure candidate loses
        assert admin.page.locator("#shadow-chart polyline").count() == 2
        admin.shot("8-shadow-panel")

        # No frozen set to gate on yet: the decision is refused with why; stopping records the reason.
        stop = admin.page.locator("#shadow-stop-form")
        stop.get_by_role("button", name="Decide on both pieces of evidence").click()
        expect(admin.page.locator("#error")).to_contain_text("has no validation version yet")
        stop.get_by_label("Reason").fill("worse on live items")
        stop.get_by_role("button", name="Stop shadow").click()
        expect(admin.page.locator("#shadow-status")).to_contain_text("stopped: worse on live items")
        assert http.get("/admin/shadow", headers=as_root).json()["live"] is None
        assert [e for e in admin.errors if "409" not in e] == [] and reviewer.errors == []
    finally:
        admin.close()
        if reviewer is not None:
            reviewer.close()
        http.close()
