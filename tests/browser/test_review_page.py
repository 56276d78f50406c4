"""The review page in headless Chromium, driven as a reviewer and an admin would, checked through the API.

Debian's `chromium` (installed by `make test` when missing) driven by Playwright for Python.
Screenshots go to `LOOP_TEST_ARTIFACTS` (default `.artifacts/browser/`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect

from feedback import review as rs
from models import digits, store
from models.importer import import_model
from models.pipeline import BuildResult
from models.spec import ModelSpec
from tests.graphs import linear_classifier
from tests.integration.conftest import ROOT, RunningService

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("LOOP_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LOOP_TEST_ARTIFACTS", ROOT / ".artifacts" / "browser"))
SENT = 16


class Session:
    """One signed-in browser page; every console error or page error is collected."""

    def __init__(self, browser: Browser, url: str, token: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        response = self.page.goto(f"{url}/review/ui")
        assert response is not None
        self.headers = response.headers
        self.page.get_by_label("Token").fill(token)
        self.page.keyboard.press("Enter")
        # Waits use Playwright's own isolated scripts: the page's CSP forbids evaluating strings in it.
        expect(self.page.locator("#notice")).to_have_text(re.compile("^Signed in"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


def predict(url: str, n: int) -> dict[str, str]:
    """n digits sent one per request, oldest first; their true labels by prediction id."""
    data = digits.load()
    truth: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for row in range(n):
            answer = http.post("/predict", json={"samples": [data.images[row].tolist()]}).json()["predictions"][0]
            truth[answer["id"]] = digits.CLASS_NAMES[int(data.labels[row])]
    return truth


def stored_verdicts(database_url: str) -> list[tuple[str, str, str, str | None]]:
    """(item, reviewer, verdict, label) of every annotation, oldest first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT a.prediction_id::text, u.name, a.verdict, a.label FROM annotations a"
            " JOIN users u ON u.id = a.actor_id ORDER BY a.id"
        ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def check_headers(headers: dict[str, str]) -> None:
    """The page runs its own script and style, nothing else, and cannot be framed."""
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe" not in policy
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"


def current(page: Page) -> str:
    item = page.locator("#stage").get_attribute("data-item")
    assert item is not None
    return item


def judge_by_keyboard(page: Page, truth: dict[str, str], count: int) -> dict[str, tuple[str, str | None]]:
    """Judge `count` items with one key each: Enter accepts, a label key corrects, x discards (the
    reason typed once per session), u is unsure. The verdicts expected in Postgres, by item."""
    expected: dict[str, tuple[str, str | None]] = {}
    for step in range(count):
        item, said = current(page), page.locator("#model-label").inner_text()
        if step == 4:
            page.keyboard.press("x")
            page.keyboard.type("blurred scan")
            page.keyboard.press("Enter")
            expected[item] = ("discard", None)
        elif step == 7:
            page.keyboard.press("u")
            expected[item] = ("unsure", None)
        elif said == truth[item]:
            page.keyboard.press("Enter")
            expected[item] = ("correct", None)
        else:
            page.keyboard.press(truth[item])
            expected[item] = ("wrong", truth[item])
        moved_from(page, item)
    return expected


def moved_from(page: Page, item: str) -> None:
    wait_for(lambda: current(page) != item, "the next item")


def discard_and_undo(page: Page, truth: dict[str, str], database_url: str) -> None:
    """A second discard needs no reason; z takes it back and the item is judged anew."""
    last = current(page)
    page.keyboard.press("x")
    moved_from(page, last)
    page.keyboard.press("z")
    wait_for(lambda: current(page) == last, "the undone item back")
    said = page.locator("#model-label").inner_text()
    page.keyboard.press(truth[last])
    again = ("correct", None) if said == truth[last] else ("wrong", truth[last])

    def recorded() -> bool:
        mine = [(v, lab) for i, _, v, lab in stored_verdicts(database_url) if i == last]
        return mine == [("discard", None), ("undo", None), again]

    wait_for(recorded, "discard, undo and the new verdict in Postgres")


def dispute(http: httpx.Client, token: str, item: str, truth: dict[str, str]) -> str:
    """Another reviewer disagrees over the API; the label they gave."""
    other = "1" if truth[item] != "1" else "2"
    headers = {"Authorization": f"Bearer {token}"}
    assert item in {c["id"] for c in http.post("/review/claim", json={"count": 100}, headers=headers).json()}
    verdict = {"prediction_id": item, "verdict": "wrong", "label": other}
    (state,) = http.post("/review/verdicts", json={"verdicts": [verdict]}, headers=headers).json()
    assert state["status"] == "disputed"
    return other


def add_sample(session: Session, database_url: str, model_name: str) -> None:
    """Paste the numbers, pick the label, add: a reviewer's sample for the model, in Postgres."""
    page = session.page
    page.get_by_role("button", name="Add a sample").click()
    page.locator("#add-label").select_option("7")
    page.get_by_label("Numbers (JSON)").fill(str(digits.load().images[7].astype(int).tolist()))
    page.get_by_label("Numbers (JSON)").dispatch_event("change")
    page.get_by_role("button", name="Add the sample").click()
    wait_for(lambda: "Added" in page.locator("#add-result").inner_text(), "the sample to be added")
    session.shot("3-add-sample")
    with psycopg.connect(database_url) as conn:
        added = conn.execute("SELECT model_name, label FROM predictions WHERE source = 'reviewer'").fetchall()
    assert added == [(model_name, "7")]


def dashboard_cells(session: Session) -> list[str]:
    session.page.get_by_role("button", name="Dashboard").click()
    session.page.wait_for_selector("#verdicts td")
    cells: list[str] = session.page.locator("#verdicts td").all_inner_texts()
    return cells


def settle_as_admin(admin: Session, http: httpx.Client, token: str, item: str, opinion: str, label: str) -> None:
    """The admin view lists the dispute with each reviewer's verdict; resolving it settles the item."""
    admin.page.get_by_role("button", name="Admin").click()
    block = admin.page.locator(".dispute", has_text=item)
    block.wait_for()
    assert "ann:" in block.inner_text() and opinion in block.inner_text()
    admin.shot("5-admin-dispute")
    block.get_by_label(f"final label of {item}").select_option(label)
    block.get_by_role("button", name="Resolve").click()
    wait_for(lambda: "reviewed as" in admin.page.locator(".dispute", has_text=item).inner_text(), "resolved")
    settled = http.get("/review/items", params={"status": "reviewed"}, headers={"Authorization": f"Bearer {token}"})
    assert item in {i["id"] for i in settled.json()["items"]}
    assert dashboard_cells(admin)[5] == "0"  # no dispute waits now
    admin.shot("6-dashboard-after")


def test_a_reviewer_works_by_keyboard_and_an_admin_settles_a_dispute(
    browser: Browser,
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    database_url: str,
) -> None:
    service = start_service(LOOP_REVIEW_OVERLAP_SHARE="1")  # every item asks for two reviewers
    truth = predict(service.url, SENT)
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, ann = rs.create_user(conn=conn, name="ann", role=rs.Role.REVIEWER)
        _, bob = rs.create_user(conn=conn, name="bob", role=rs.Role.REVIEWER)
        _, root = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    http = httpx.Client(base_url=service.url, timeout=30)
    as_ann = {"Authorization": f"Bearer {ann}"}
    wait_for(lambda: http.get("/review/counts", headers=as_ann).json()["unmoderated"] == SENT, "the predictions stored")

    reviewer = Session(browser, service.url, ann)
    admin: Session | None = None
    try:
        page = reviewer.page
        assert page.locator("#admin-tab").is_hidden()  # a reviewer is not offered the admin view
        check_headers(reviewer.headers)
        page.keyboard.press("Enter")  # sign-in leaves the focus on "Start reviewing"
        page.wait_for_selector("#stage:not([hidden])")
        reviewer.shot("1-review-screen")
        expected = judge_by_keyboard(page, truth, 12)  # 12 items, 12 keystrokes (+ the reason once)
        wait_for(lambda: len(stored_verdicts(database_url)) == 12, "12 verdicts in Postgres")
        stored = {(i, v, lab) for i, who, v, lab in stored_verdicts(database_url) if who == "ann"}
        assert stored == {(i, v, lab) for i, (v, lab) in expected.items()}
        discard_and_undo(page, truth, database_url)
        page.keyboard.press("?")
        assert page.locator("#help").is_visible()
        reviewer.shot("2-keys")
        page.keyboard.press("Escape")
        assert page.locator("#help").is_hidden()

        disputed = next(i for i, (v, _) in expected.items() if v in ("correct", "wrong"))
        other = dispute(http, bob, disputed, truth)
        add_sample(reviewer, database_url, trained_model.stored.name)

        cells = dashboard_cells(reviewer)
        reviewer.shot("4-dashboard")
        counts = http.get("/review/counts", headers=as_ann).json()
        assert cells[0] == str(counts["moderated"]) and cells[5] == "1" == str(counts["verdicts"]["disputed"])
        assert page.locator("#chart rect").count() >= 2
        page.goto(f"{service.url}/review/ui#admin")  # a reviewer who opens the admin view anyway
        expect(page.locator("#admin-only")).to_contain_text("needs an admin")
        assert page.locator("#admin-body").is_hidden()

        admin = Session(browser, service.url, root)
        settle_as_admin(admin, http, root, disputed, f"bob: {other}", truth[disputed])
        assert reviewer.errors == [] and admin.errors == []
    finally:
        reviewer.close()
        if admin is not None:
            admin.close()
        http.close()


# -- an image model: a wide line of text keeps its shape -------------------------------------------

LINE_CLASSES = ("hello", "world", "other")


@pytest.fixture(scope="module")
def line_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    """A team's model of one line of text (any weights): grey images scaled to 16 high, up to 64 wide."""
    spec = ModelSpec.model_validate({
        "input": {"kind": "image", "width": 64, "height": 16, "mode": "L", "resize": "fit-height",
                  "pad_value": [255]},
        "classes": list(LINE_CLASSES), "onnx_input": "image",
    })  # fmt: skip
    path = linear_classifier(tmp_path_factory.mktemp("onnx") / "lines.onnx", input_dims=["batch", 1, 16, 64],
                             features=16 * 64)  # fmt: skip
    return import_model("team-lines-browser", path, spec)


def wide_png(width: int = 400, height: int = 100) -> bytes:
    """A 4:1 line of 'text': black strokes on white, a frame to show its edges."""
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline=0, width=3)
    for x in range(20, width - 40, 40):
        draw.line((x, 25, x + 20, height - 25), fill=0, width=6)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def shown_size(page: Page) -> tuple[float, float]:
    box = page.locator("#sample").bounding_box()
    assert box is not None
    return box["width"], box["height"]


def own_label_refused_then_accepted(session: Session, item: str, label: str, database_url: str) -> None:
    """The page's next verdict is rewritten into a 'wrong' one naming the model's own label, as a
    stale or faulty client might send it: the page shows the service's refusal and keeps the item;
    the page's own verdict ('correct') is then saved."""
    page = session.page

    def rewrite(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        body["verdicts"] = [{"prediction_id": v["prediction_id"], "verdict": "wrong", "label": label}
                            for v in body["verdicts"]]  # fmt: skip
        route.continue_(post_data=json.dumps(body))

    page.route("**/review/verdicts", rewrite, times=1)
    page.keyboard.press("Enter")
    try:
        expect(page.locator("#error")).to_contain_text(
            "is the label proposed; a 'correct' verdict says that", timeout=15_000
        )
    except AssertionError as exc:  # say what the page did instead (locators: the page's CSP forbids eval)
        focused = page.locator(":focus")
        focus = focused.first.get_attribute("id") if focused.count() else None
        notice = page.locator("#notice").text_content()
        raise AssertionError(f"{exc}; focus on {focus!r}, notice {notice!r}; console: {session.errors}") from None
    assert current(page) == item and stored_verdicts(database_url) == []
    page.keyboard.press("Enter")
    wait_for(lambda: stored_verdicts(database_url) == [(item, "ann", "correct", None)], "the verdict in Postgres")
    expect(page.locator("#error")).to_have_text("")
    # The one console error is the browser's own line about the refused request.
    assert len(session.errors) == 1 and "422" in session.errors[0], session.errors


def test_a_wide_image_keeps_its_shape_and_can_be_seen_at_its_own_size(
    browser: Browser,
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    line_model: store.StoredModel,
    database_url: str,
) -> None:
    service = start_service(LOOP_MODELS=f"{trained_model.stored.tag},{line_model.name}", LOOP_REVIEW_OVERLAP_SHARE="0")
    http = httpx.Client(base_url=service.url, timeout=30)
    sent = {"model": line_model.name, "samples": [base64.b64encode(wide_png()).decode()]}
    answer = http.post("/predict", json=sent)
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["predictions"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, ann = rs.create_user(conn=conn, name="ann", role=rs.Role.REVIEWER)
    as_ann = {"Authorization": f"Bearer {ann}"}
    of_lines = {"model": line_model.name}
    wait_for(lambda: http.get("/review/counts", params=of_lines, headers=as_ann).json()["unmoderated"] == 1, "stored")

    reviewer = Session(browser, service.url, ann)
    try:
        page = reviewer.page
        page.locator("#f-model").select_option(line_model.name)
        page.get_by_role("button", name="Start reviewing").click()
        page.wait_for_selector("#stage:not([hidden])")
        assert current(page) == prediction["id"]
        sample = page.locator("#sample")
        expect(sample).to_have_attribute("width", "400")  # drawn once the image has loaded
        expect(sample).to_have_attribute("height", "100")
        width, height = shown_size(page)
        assert width / height == pytest.approx(4.0, rel=0.02), (width, height)  # not squashed into a square
        assert width < 400  # fitted to the column
        reviewer.shot("7-wide-image")

        page.keyboard.press("=")  # the image at its own size: one image pixel per CSS pixel
        expect(page.locator("#natural")).to_have_attribute("aria-pressed", "true")
        assert shown_size(page) == pytest.approx((400, 100), abs=1)
        reviewer.shot("8-wide-image-natural")
        sample.click()  # a click fits it again
        expect(page.locator("#natural")).to_have_attribute("aria-pressed", "false")
        assert shown_size(page) == pytest.approx((width, height), abs=1)
        page.get_by_role("button", name="Actual size").click()
        assert shown_size(page)[0] == pytest.approx(400, abs=1)
        page.keyboard.press("=")
        assert shown_size(page)[0] == pytest.approx(width, abs=1)
        page.keyboard.press("?")
        expect(page.locator("#help")).to_contain_text("its own size")
        page.keyboard.press("Escape")

        own_label_refused_then_accepted(reviewer, prediction["id"], prediction["label"], database_url)
    finally:
        reviewer.close()
        http.close()
