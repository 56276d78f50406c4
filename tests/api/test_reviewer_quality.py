"""Per-reviewer quality on a fixture computed by hand: three reviewers on the same items (each item
asks for two reviews), leases held for known times, an undo and a discard; `GET /admin/reviewers`
gives exactly the hand figures and flags those beyond the targets an admin sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg_pool import ConnectionPool
from starlette.testclient import TestClient

from feedback import review as rs
from service.routes.dependencies import ModerationContext
from service.routes.reviewers import router as reviewers_router
from tests.api.test_admin_api import reviewing_client
from tests.api.test_review_api import LABELS, make_user, pool, seed  # noqa: F401 (a fixture)

pytestmark = pytest.mark.api


@pytest.fixture
def client(pool: ConnectionPool, tmp_path: Path) -> Iterator[TestClient]:  # noqa: F811
    # Every item asks for two reviews.
    moderation = ModerationContext(pool=pool, lease_seconds=60, overlap=2, overlap_share=1.0, labels=lambda: LABELS)
    with reviewing_client(moderation, tmp_path, reviewers_router) as client:
        yield client


def judge(
    client: TestClient,
    connections: ConnectionPool,
    headers: dict[str, str],
    user: str,
    plan: list[tuple[str, str | None, float]],
) -> list[str]:
    """Claim len(plan) items (each asks for 2 reviews) and give the planned verdicts, each lease having
    been held for its planned seconds; the ids."""
    items = client.post("/review/claim", json={"count": len(plan)}, headers=headers).json()
    assert len(items) == len(plan)
    with connections.connection() as conn:
        for item, (_, _, held) in zip(items, plan, strict=True):
            conn.execute(
                "UPDATE leases SET leased_at = clock_timestamp() - make_interval(secs => %s)"
                " WHERE prediction_id = %s AND user_id = (SELECT id FROM users WHERE name = %s)",
                (held, item["id"], user),
            )
    verdicts = []
    for item, (verdict, label, _) in zip(items, plan, strict=True):
        one = {"prediction_id": item["id"], "verdict": verdict}
        if verdict == "wrong":
            one["label"] = label if label != item["label"] else str((int(label or 0) + 1) % 10)
        if verdict == "discard":
            one["reason"] = "blurred"
        verdicts.append(one)
    answer = client.post("/review/verdicts", json={"verdicts": verdicts}, headers=headers)
    assert answer.status_code == 200, answer.text
    return [i["id"] for i in items]


def test_per_reviewer_figures_equal_a_hand_computation(
    client: TestClient,
    pool: ConnectionPool,  # noqa: F811
    database_url: str,
) -> None:
    seed(database_url, 4)
    _, admin = make_user(pool, "boss", rs.Role.ADMIN)
    reviewers = {name: make_user(pool, name)[1] for name in ("ann", "bob", "cid")}

    # ann and bob each judge the 4 items: both say "correct" on items 0-2; on item 3 ann says
    # correct and bob says wrong: a dispute, not settled. Leases held 10, 20, 30, 40 s (ann) and 5 s (bob).
    ids = judge(client, pool, reviewers["ann"], "ann", [("correct", None, s) for s in (10, 20, 30, 40)])
    bob = judge(client, pool, reviewers["bob"], "bob", [("correct", None, 5)] * 3 + [("wrong", "1", 5)])
    assert sorted(ids) == sorted(bob)
    # bob takes his last verdict back (an undo), cid gets nothing to review (two reviews each already).
    undone = client.post("/review/undo", json={"prediction_id": bob[3]}, headers=reviewers["bob"])
    assert undone.status_code == 200, undone.text

    found = client.get("/admin/reviewers", headers=admin).json()
    rows = {r["reviewer"]: r for r in found["reviewers"]}
    assert set(rows) == {"ann", "bob"}
    ann, bob_row = rows["ann"], rows["bob"]
    assert (ann["verdicts"], ann["active_days"], ann["per_day"]) == (4, 1, 4.0)
    assert ann["median_seconds"] == pytest.approx(25, abs=1)  # of 10, 20, 30, 40
    assert bob_row["median_seconds"] == pytest.approx(5, abs=1)
    # Settled: items 0-2 (both said correct); item 3 waits for bob again after his undo.
    assert (ann["agreed"], ann["settled"], ann["agreement"]) == (3, 3, 1.0)
    assert (bob_row["agreed"], bob_row["settled"]) == (3, 3)
    assert (bob_row["undos"], bob_row["undo_rate"]) == (1, 0.25)
    assert (ann["undos"], ann["discards"], ann["discard_rate"]) == (0, 0, 0.0)
    assert ann["flags"] == [] and bob_row["flags"] == ["undo_rate"]  # the default target: at most 10%

    targets = {"max_median_seconds": 20.0, "max_undo_rate": 0.5, "min_agreement": 0.9, "min_per_day": 4.5}
    set_answer = client.put("/admin/reviewers/targets", json=targets, headers=admin)
    assert set_answer.status_code == 200, set_answer.text
    rows = {r["reviewer"]: r for r in client.get("/admin/reviewers", headers=admin).json()["reviewers"]}
    assert rows["ann"]["flags"] == ["per_day", "median_seconds"] and rows["bob"]["flags"] == ["per_day"]
    assert client.get("/admin/reviewers", headers=reviewers["ann"]).status_code == 403
    assert client.put("/admin/reviewers/targets", json={"max_undo_rate": 2.0}, headers=admin).status_code == 422
    since_after = client.get("/admin/reviewers", params={"since": "2100-01-01T00:00:00Z"}, headers=admin)
    assert since_after.status_code == 200 and since_after.json()["reviewers"] == []  # an empty period
