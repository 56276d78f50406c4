"""Guidelines per model through the API in-process: an admin publishes versions, a reviewer's claim
is refused until they read the current one, each verdict records the version it was given under,
and raw HTML in the Markdown never reaches the page as HTML."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from starlette.testclient import TestClient

from feedback import review as rs
from service.routes.dependencies import ModerationContext
from service.routes.guidelines import router as guidelines_router
from tests.api.test_admin_api import reviewing_client
from tests.api.test_review_api import context, make_user, pool, seed  # noqa: F401 (fixtures)

pytestmark = pytest.mark.api

MODEL = "digits-cnn"


@pytest.fixture
def client(context: ModerationContext, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    with reviewing_client(context, tmp_path, guidelines_router) as client:
        yield client


def test_a_new_version_is_read_once_before_the_next_claim_and_recorded_with_each_verdict(
    client: TestClient,
    pool: ConnectionPool,  # noqa: F811
    database_url: str,
) -> None:
    seed(database_url, 30)
    _, admin = make_user(pool, "boss", rs.Role.ADMIN)
    _, ann = make_user(pool, "ann")
    claim = {"count": 2, "model_name": MODEL}
    assert client.post("/review/claim", json=claim, headers=ann).status_code == 200  # no guidelines yet

    first = client.put(
        "/admin/guidelines",
        params={"model": MODEL},
        json={"markdown": "# Digits\n\nA **7** has no bar."},
        headers=admin,
    )
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and "<strong>7</strong>" in first.json()["html"]
    refused = client.post("/review/claim", json=claim, headers=ann)
    assert refused.status_code == 409 and "read the guidelines of digits-cnn (version 1)" in refused.json()["detail"]
    shown = client.get("/review/guidelines", params={"model": MODEL}, headers=ann).json()
    assert shown["read"] is False and [g["version"] for g in shown["unread"]] == [1]
    assert (
        client.post("/review/guidelines/read", json={"model_name": MODEL, "version": 1}, headers=ann).status_code == 204
    )
    items = client.post("/review/claim", json=claim, headers=ann).json()
    verdict = {"prediction_id": items[0]["id"], "verdict": "correct"}
    assert client.post("/review/verdicts", json={"verdicts": [verdict]}, headers=ann).status_code == 200

    second = client.put(
        "/admin/guidelines", json={"markdown": "A 7 may have a bar. <script>alert(1)</script>"}, headers=admin
    )
    assert second.status_code == 201 and second.json()["version"] == 2
    assert "<script>" not in second.json()["html"] and "&lt;script&gt;" in second.json()["html"]
    assert client.post("/review/claim", json=claim, headers=ann).status_code == 409  # a new version: read again
    assert (
        client.post("/review/guidelines/read", json={"model_name": MODEL, "version": 2}, headers=ann).status_code == 204
    )
    assert (
        client.post("/review/guidelines/read", json={"model_name": MODEL, "version": 2}, headers=ann).status_code == 204
    )
    verdict = {"prediction_id": items[1]["id"], "verdict": "correct"}
    assert client.post("/review/verdicts", json={"verdicts": [verdict]}, headers=ann).status_code == 200
    with psycopg.connect(database_url) as conn:
        recorded = conn.execute(
            "SELECT prediction_id::text, guidelines_version FROM annotations ORDER BY id"
        ).fetchall()
    assert recorded == [(items[0]["id"], 1), (items[1]["id"], 2)]

    history = client.get("/admin/guidelines", params={"model": MODEL}, headers=admin).json()
    assert [(g["version"], g["created_by"]) for g in history] == [(1, "boss"), (2, "boss")]
    assert client.get("/admin/guidelines", headers=ann).status_code == 403
    assert (
        client.put("/admin/guidelines", params={"model": "nobody"}, json={"markdown": "x"}, headers=admin).status_code
        == 404
    )
    assert client.put("/admin/guidelines", json={"markdown": ""}, headers=admin).status_code == 422
    missing = client.post("/review/guidelines/read", json={"model_name": MODEL, "version": 9}, headers=ann)
    assert missing.status_code == 404
