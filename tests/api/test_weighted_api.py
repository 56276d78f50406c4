"""`GET /admin/weighted` and `POST /admin/datasets` with `weighted`: simulated reviewers (three
careful, one careless) judge the digits model's items two each; the route ranks the careless one
last and lists every open dispute with its weighted label, and a compile with weighting takes the
disputes it says are settled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg_pool import ConnectionPool
from starlette.testclient import TestClient

from experiments.reviewers import Reviewer, judge_all, log_items
from feedback import review as rs
from feedback.datasets import read_version
from models import digits
from service.routes.admin import router as admin_router
from service.routes.dependencies import ModerationContext
from service.routes.reviewers import router as reviewers_router
from tests.api.test_admin_api import reviewing_client
from tests.api.test_review_api import make_user, pool  # noqa: F401 (a fixture)

pytestmark = pytest.mark.api

CAREFUL = [Reviewer(f"careful-{i}", 0.02) for i in range(3)]
CARELESS = Reviewer("careless", 0.30)


@pytest.fixture
def client(pool: ConnectionPool, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    moderation = ModerationContext(pool=pool, labels=lambda: digits.CLASS_NAMES)
    with reviewing_client(moderation, tmp_path, reviewers_router, admin_router) as client:
        yield client


def test_weights_rank_the_careless_reviewer_last_and_settle_disputes_in_a_compile(
    client: TestClient,
    pool: ConnectionPool,  # noqa: F811
    database_url: str,
) -> None:
    rng = np.random.default_rng(3)
    with psycopg.connect(database_url, autocommit=True) as conn:
        items = log_items(conn, model_name="digits-cnn", classes=digits.CLASS_NAMES, n=300, model_accuracy=0.7,
                          rng=rng, input_shape=digits.INPUT_SHAPE)  # fmt: skip
        judge_all(conn, items, [*CAREFUL, CARELESS], per_item=2, classes=digits.CLASS_NAMES, rng=rng)
        disputed = {str(r[0]) for r in conn.execute("SELECT prediction_id FROM review_state WHERE status = 'disputed'")}
    _, admin = make_user(pool, "boss", rs.Role.ADMIN)

    answer = client.get("/admin/weighted", params={"model": "digits-cnn"}, headers=admin)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["method"] == "dawid-skene" and found["judged_items"] == len(items)
    reliability = found["reliability"]
    assert min(reliability, key=reliability.get) == CARELESS.name and len(reliability) == 4
    assert {d["prediction_id"] for d in found["disputes"]} == disputed
    settles = {d["prediction_id"]: d["label"] for d in found["disputes"] if d["settles"]}
    assert all(d["settles"] == (d["confidence"] >= found["min_confidence"]) for d in found["disputes"])
    assert settles

    compiled = client.post("/admin/datasets", params={"model": "digits-cnn"}, json={"weighted": True}, headers=admin)
    assert compiled.status_code == 201, compiled.text
    version = compiled.json()
    assert version["manifest"]["aggregation"]["settled_disputes"] == len(settles)
    rows = read_version(version["uri"])
    taken = {i: digits.CLASS_NAMES[int(k)] for i, k in zip(rows.item_ids, rows.labels, strict=True) if i in disputed}
    assert taken == settles

    unknown = client.get("/admin/weighted", params={"model": "nobody"}, headers=admin)
    assert unknown.status_code == 404


def test_suspects_are_listed_most_likely_first(
    client: TestClient,
    pool: ConnectionPool,  # noqa: F811
) -> None:
    _, admin = make_user(pool, "boss", rs.Role.ADMIN)
    with pool.connection() as conn:
        for rank, item in ((2, "orig-7"), (1, "orig-3"), (3, "orig-9")):
            conn.execute(
                "INSERT INTO label_suspects (model_name, item_id, rank, quality, label, suggested, dataset_id,"
                " watermark) VALUES ('digits-cnn', %s, %s, 0.1, '1', '7', 'd', 0)",
                (item, rank),
            )
    answer = client.get("/admin/suspects", params={"model": "digits-cnn", "limit": 2}, headers=admin)
    assert answer.status_code == 200, answer.text
    assert [(s["rank"], s["item_id"], s["prediction_id"]) for s in answer.json()] == [
        (1, "orig-3", None),
        (2, "orig-7", None),
    ]
    assert client.get("/admin/suspects", params={"model": "digits-cnn"}).status_code == 401
