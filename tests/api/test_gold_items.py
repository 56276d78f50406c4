"""Gold items through the API in-process: an admin marks items with their right labels; claims mix
them in (here every place), looking like any other item; a reviewer's answers on them are scored
but never change the items nor become annotations; an undo withdraws one; `GET /admin/reviewers`
gives each reviewer's gold accuracy with Wilson's interval, equal to a hand computation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from starlette.testclient import TestClient

from feedback import review as rs
from models.health import judged_accuracy
from service.routes.dependencies import ModerationContext
from service.routes.reviewers import router as reviewers_router
from tests.api.test_admin_api import reviewing_client
from tests.api.test_review_api import LABELS, make_user, pool, seed  # noqa: F401 (a fixture)

pytestmark = pytest.mark.api


@pytest.fixture
def client(pool: ConnectionPool, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    moderation = ModerationContext(pool=pool, lease_seconds=60, overlap=1, gold_share=1.0, labels=lambda: LABELS)
    with reviewing_client(moderation, tmp_path, reviewers_router) as client:
        yield client


def state_of(database_url: str) -> tuple[list[tuple[object, ...]], int]:
    with psycopg.connect(database_url) as conn:
        states = conn.execute("SELECT * FROM review_state ORDER BY prediction_id").fetchall()
        annotations = conn.execute("SELECT count(*) FROM annotations").fetchone()
    return states, int(annotations[0])  # type: ignore[index]


def test_gold_answers_measure_reviewers_and_change_nothing(
    client: TestClient,
    pool: ConnectionPool,  # noqa: F811
    database_url: str,
) -> None:
    truth = seed(database_url, 12)
    _, admin = make_user(pool, "boss", rs.Role.ADMIN)
    _, ann = make_user(pool, "ann")
    golds = truth[:6]
    # The right labels: the model's own for the first three, another for the last three.
    right = {g["id"]: g["label"] if i < 3 else str((int(g["label"]) + 1) % 10) for i, g in enumerate(golds)}
    marked = client.post(
        "/admin/gold",
        json={"items": [{"prediction_id": i, "label": label} for i, label in right.items()]},
        headers=admin,
    )
    assert marked.status_code == 200, marked.text
    assert {(g["prediction_id"], g["label"], g["source"]) for g in marked.json()} == {
        (i, label, "admin") for i, label in right.items()
    }
    before = state_of(database_url)

    claimed = client.post("/review/claim", json={"count": 6}, headers=ann).json()
    assert {c["id"] for c in claimed} == set(right)  # every place gold (share 1.0), all of them, once each
    assert all(
        set(c) == set(claimed[0]) and c["label"] == next(t["label"] for t in truth if t["id"] == c["id"])
        for c in claimed
    )
    # ann: "correct" on all six: right on the first three (the model was right), wrong on the others.
    answer = client.post(
        "/review/verdicts",
        json={"verdicts": [{"prediction_id": c["id"], "verdict": "correct"} for c in claimed]},
        headers=ann,
    )
    assert answer.status_code == 200, answer.text
    assert state_of(database_url) == before  # no annotation, no state changed
    # She takes one of the wrong ones back and answers it right this time.
    wrong = next(i for i in right if right[i] != next(t["label"] for t in truth if t["id"] == i))
    again = client.post("/review/undo", json={"prediction_id": wrong}, headers=ann)
    assert again.status_code == 200 and again.json()["id"] == wrong, again.text
    fixed = {"prediction_id": wrong, "verdict": "wrong", "label": right[wrong]}
    assert client.post("/review/verdicts", json={"verdicts": [fixed]}, headers=ann).status_code == 200
    assert state_of(database_url) == before

    # A normal verdict (no gold left for ann) so that she is listed; then her figures.
    normal = client.post("/review/claim", json={"count": 1}, headers=ann).json()
    assert normal and normal[0]["id"] not in right
    client.post(
        "/review/verdicts", json={"verdicts": [{"prediction_id": normal[0]["id"], "verdict": "correct"}]}, headers=ann
    )
    (row,) = client.get("/admin/reviewers", headers=admin).json()["reviewers"]
    expected = judged_accuracy(4, 2)  # right: 3 + the one fixed; wrong: 2
    assert expected is not None
    assert (row["gold_right"], row["gold_scored"]) == (4, 6)
    assert row["gold_accuracy"] == pytest.approx(4 / 6)
    assert (row["gold_low"], row["gold_high"]) == (pytest.approx(expected.low), pytest.approx(expected.high))
    # Below the default target of 0.9, but six answers are too few to flag (tests/unit/test_gold_flag.py).
    assert "gold_accuracy" not in row["flags"]
    assert client.get("/admin/gold", headers=admin).json() == marked.json()
    refused = client.post(
        "/admin/gold",
        json={"items": [{"prediction_id": "01890a5d-ac96-774b-bcce-b302099a8057", "label": "1"}]},
        headers=admin,
    )
    assert refused.status_code == 404 and "not a logged prediction" in refused.json()["detail"]
    strange = client.post(
        "/admin/gold", json={"items": [{"prediction_id": golds[0]["id"], "label": "cat"}]}, headers=admin
    )
    assert strange.status_code == 409 and "not classes of digits-cnn: cat" in strange.json()["detail"]
    assert client.post("/admin/gold", json={}, headers=admin).json() == marked.json()  # nothing named: the list
    unknown = client.post("/admin/gold", json={"from_validation": "0" * 32}, headers=admin)
    assert unknown.status_code == 404 and "is not a validation version" in unknown.json()["detail"]
