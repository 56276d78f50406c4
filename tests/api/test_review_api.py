"""The reviewers' API in-process (FastAPI app with the review router) on a database of its own."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi import FastAPI
from psycopg_pool import ConnectionPool
from starlette.testclient import TestClient

from feedback import review as rs
from feedback.ids import compose_uuid7
from feedback.predictions import store
from feedback.predictions.records import PredictionRecord, decode_row, encode
from feedback.predictions.records import created_at as uuid_created_at
from models.npy import npy_bytes
from service.routes import application
from service.routes.dependencies import ModerationContext
from service.routes.review import router

pytestmark = pytest.mark.api

LABELS = tuple(str(i) for i in range(10))
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def seed(
    database_url: str, n: int, *, start: datetime = T0, step_s: float = 60, seed_: int = 0,
    model_name: str = "digits-cnn",
) -> list[dict[str, Any]]:  # fmt: skip
    """n predictions, one every `step_s` seconds from `start`, with varied labels, models, confidences."""
    rng = np.random.default_rng(seed_)
    rows, truth = [], []
    for i in range(n):
        at = start + timedelta(seconds=i * step_s)
        pid = compose_uuid7(int(at.timestamp() * 1000), 0, int(rng.integers(0, 2**62)))
        label = str(rng.integers(0, 10))
        confidence = float(np.float32(rng.uniform(0.3, 1.0)))
        model = (model_name, "v1" if i % 3 else "v2")
        record = PredictionRecord(
            id=pid, model_name=model[0], model_version=model[1],
            input=rng.integers(0, 17, size=(8, 8)).astype(np.float32),
            scores=np.full(10, 0.05, np.float32), label=label, confidence=confidence, request_id=f"r{i}",
        )  # fmt: skip
        rows.append(decode_row(encode(record)))
        truth.append({"id": str(pid), "created_at": record.created_at, "model_name": model[0],
                      "model_version": model[1], "label": label, "confidence": confidence})  # fmt: skip
    with psycopg.connect(database_url, autocommit=True) as conn:
        store.insert_rows(conn=conn, rows=rows)
    return truth


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(database_url, min_size=1, max_size=10, kwargs={"autocommit": True}) as p:
        yield p


@pytest.fixture
def context(pool: ConnectionPool) -> ModerationContext:
    return ModerationContext(pool=pool, lease_seconds=60, overlap=2, overlap_share=0.0, labels=lambda: LABELS)


@pytest.fixture
def client(context: ModerationContext) -> Iterator[TestClient]:
    app = application(router)
    app.state.moderation = context
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def make_user(pool: ConnectionPool, name: str, role: rs.Role = rs.Role.REVIEWER) -> tuple[rs.User, dict[str, str]]:
    with pool.connection() as conn:
        user, token = rs.create_user(conn=conn, name=name, role=role)
    return user, {"Authorization": f"Bearer {token}"}


def table_sizes(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return {
            t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
            for t in ("predictions", "annotations", "review_state", "leases", "users")
        }


def review_rows(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row reviewing writes: annotations, review states, leases (with their expiry), the audit log."""
    with psycopg.connect(database_url) as conn:
        return {
            t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
            for t in ("annotations", "review_state", "leases", "audit_log")
        }


# -- claiming and leases --------------------------------------------------------------------------


def test_concurrent_claims_are_answered_in_full_while_the_queue_holds_enough(
    database_url: str, pool: ConnectionPool
) -> None:
    """A claim racing another one (which committed leases on rows this one's snapshot saw free) locks
    again instead of coming back short or empty."""
    seed(database_url, 600)
    reviewers = [make_user(pool, f"r{i}")[0] for i in range(6)]
    sizes: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(reviewers))

    def work(user: rs.User) -> None:
        barrier.wait()
        for _ in range(15):  # 6 x 15 x 5 = 450 of the 600 items
            with pool.connection() as conn:
                claimed = rs.claim(conn=conn, user=user, count=5, strategy=rs.Strategy.OLDEST, lease_seconds=120)
            with lock:
                sizes.append(len(claimed))

    threads = [threading.Thread(target=work, args=(u,)) for u in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(Counter(sizes).items()) == [(5, 90)]


def test_eight_concurrent_reviewers_never_exceed_an_items_overlap(database_url: str, pool: ConnectionPool) -> None:
    seed(database_url, 240)
    reviewers = [make_user(pool, f"r{i}")[0] for i in range(8)]
    handed: list[tuple[uuid.UUID, int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(reviewers))

    def take(user: rs.User) -> bool:
        with pool.connection() as conn:
            claimed = rs.claim(
                conn=conn, user=user, count=7, strategy=rs.Strategy.OLDEST, lease_seconds=120,
                overlap=2, overlap_share=0.3,
            )  # fmt: skip
        with lock:
            handed.extend((c.prediction_id, user.id, c.required_reviews) for c in claimed)
        return bool(claimed)

    def work(user: rs.User) -> None:
        barrier.wait()
        while take(user):
            pass

    threads = [threading.Thread(target=work, args=(u,)) for u in reviewers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # SKIP LOCKED passes over rows another claim holds for a moment, so a claim can come back empty
    # while an item still wants a second reviewer; once nobody else claims, it is handed out.
    while any([take(u) for u in reviewers]):
        pass
    per_item = Counter(item for item, _, _ in handed)
    required = {item: req for item, _, req in handed}
    assert len(per_item) == 240  # every item was handed out
    assert all(per_item[i] == required[i] for i in per_item), "an item went to more (or fewer) reviewers than it needs"
    assert len({(i, u) for i, u, _ in handed}) == len(handed)  # nobody got the same item twice
    overlapped = sum(1 for r in required.values() if r == 2)
    assert 0.15 * 240 < overlapped < 0.45 * 240


def test_expired_leases_return_items_and_late_verdicts_get_409(client: TestClient, pool: ConnectionPool,
                                                               database_url: str) -> None:  # fmt: skip
    seed(database_url, 3)
    _, ann = make_user(pool, "ann")
    _, bob = make_user(pool, "bob")
    claimed = client.post("/review/claim", json={"count": 3, "lease_seconds": 1}, headers=ann).json()
    assert len(claimed) == 3
    assert client.post("/review/claim", json={"count": 3}, headers=bob).json() == []  # all leased
    time.sleep(1.2)
    late = client.post("/review/verdicts", headers=ann,
                       json={"verdicts": [{"prediction_id": claimed[0]["id"], "verdict": "correct"}]})  # fmt: skip
    assert late.status_code == 409
    again = client.post("/review/claim", json={"count": 3}, headers=bob).json()
    assert sorted(c["id"] for c in again) == sorted(c["id"] for c in claimed)


def test_a_review_request_checks_out_one_connection_for_the_caller_and_the_work(
    client: TestClient, pool: ConnectionPool, database_url: str
) -> None:
    seed(database_url, 2)
    _, ann = make_user(pool, "ann")
    _, boss = make_user(pool, "boss", rs.Role.ADMIN)
    for method, path, body, headers in [
        ("POST", "/review/claim", {"count": 2}, ann),  # a reviewer's write
        ("GET", "/review/items", None, ann),  # a read
        ("GET", "/review/users", None, boss),  # an admin's
        ("GET", "/review/users", None, ann),  # refused (403) after the caller was looked up
    ]:
        before = pool.get_stats()["requests_num"]
        response = client.request(method, path, json=body, headers=headers)
        assert response.status_code in (200, 403), response.text
        assert pool.get_stats()["requests_num"] - before == 1, (method, path)
    before = pool.get_stats()["requests_num"]
    assert client.get("/review/items").status_code == 401  # no token: the database is not asked
    assert pool.get_stats()["requests_num"] == before


def _next(item: dict[str, Any]) -> str:
    return str((int(item["label"]) + 1) % 10)


def shadow_predicts(database_url: str, labels: dict[str, str], confidence: float = 0.5) -> None:
    """A shadow (version v9) predicted `labels[item]` for the items of digits-cnn named."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for pid, label in labels.items():
            conn.execute(
                "INSERT INTO shadow_predictions (prediction_id, created_at, model_name, model_version, label,"
                " label_index, confidence, scores, request_id) VALUES (%s, %s, 'digits-cnn', 'v9', %s, %s, %s, %s,"
                " 'r')",
                (pid, uuid_created_at(uuid.UUID(pid)), label, int(label), confidence, [0.1] * 10),
            )


def test_the_disagree_order_offers_a_shadows_disagreements_first_with_a_uniform_slice(
    client: TestClient, context: ModerationContext, pool: ConnectionPool, database_url: str
) -> None:
    truth = seed(database_url, 30)
    shadowed = truth[:20]  # the last ten were not shadowed
    disagreeing = {t["id"] for t in shadowed[::4]}  # five
    shadow_predicts(database_url, {t["id"]: _next(t) if t["id"] in disagreeing else t["label"] for t in shadowed})
    _, ann = make_user(pool, "ann")
    _, bob = make_user(pool, "bob")
    context.mixed_share = 0.0
    first = client.post("/review/claim", json={"count": 8, "strategy": "disagree"}, headers=ann).json()
    ids = [c["id"] for c in first]
    assert set(ids[:5]) == disagreeing and len(ids) == 8  # then the agreeing ones, in time order
    assert ids[5:] == [t["id"] for t in shadowed if t["id"] not in disagreeing][:3]
    # The whole queue of a reviewer holds only shadowed items; with a slice of 1, all come in time order.
    context.mixed_share = 1.0
    rest = client.post("/review/claim", json={"count": 30, "strategy": "disagree"}, headers=bob).json()
    assert [c["id"] for c in rest] == [t["id"] for t in shadowed if t["id"] not in ids]


def test_a_blind_review_shows_one_label_of_two_and_the_verdict_judges_both(
    client: TestClient, pool: ConnectionPool, database_url: str
) -> None:
    truth = seed(database_url, 40)
    shadow_predicts(database_url, {t["id"]: _next(t) for t in truth}, confidence=0.25)  # every one disagrees
    _, ann = make_user(pool, "ann")
    claimed = client.post("/review/claim", json={"count": 40, "strategy": "disagree"}, headers=ann).json()
    assert len(claimed) == 40 and all(c["blind"] and c["model_version"] is None for c in claimed)
    answers = {t["id"]: t for t in truth}
    shadows_shown = [c for c in claimed if c["label"] == _next(answers[c["id"]])]
    answers_shown = [c for c in claimed if c["label"] == answers[c["id"]]["label"]]
    assert len(shadows_shown) + len(answers_shown) == 40 and shadows_shown and answers_shown  # a fair coin each
    assert {c["confidence"] for c in shadows_shown} == {0.25}  # the proposer's, whichever it is
    assert all(c["confidence"] == pytest.approx(answers[c["id"]]["confidence"], rel=1e-6) for c in answers_shown)

    # A correction to the label shown is refused; to the other model's label, it is a correction.
    shown_shadow = shadows_shown[0]
    refused = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": shown_shadow["id"], "verdict": "wrong", "label": shown_shadow["label"]}]})  # fmt: skip
    assert refused.status_code == 422 and "is the label proposed" in refused.json()["detail"]
    verdicts = [{"prediction_id": c["id"], "verdict": "correct"} for c in claimed[1:] if c is not shown_shadow]
    verdicts.append(
        {"prediction_id": shown_shadow["id"], "verdict": "wrong", "label": answers[shown_shadow["id"]]["label"]}
    )
    if claimed[0] is not shown_shadow:
        verdicts.append({"prediction_id": claimed[0]["id"], "verdict": "correct"})
    assert client.post("/review/verdicts", json={"verdicts": verdicts}, headers=ann).status_code == 200

    # 'correct' settled the label shown, whoever proposed it.
    with psycopg.connect(database_url, autocommit=True) as conn:
        settled = rs.final_labels(conn=conn, ids=[uuid.UUID(t["id"]) for t in truth])
    expected = {c["id"]: c["label"] for c in claimed} | {shown_shadow["id"]: answers[shown_shadow["id"]]["label"]}
    assert {str(k): v for k, v in settled.items()} == {i: ("reviewed", label) for i, label in expected.items()}

    # An undo shows the same label again, still blind.
    again = client.post("/review/undo", json={"prediction_id": shadows_shown[-1]["id"]}, headers=ann).json()
    assert again["blind"] and again["label"] == shadows_shown[-1]["label"] and again["confidence"] == 0.25


def test_verdict_on_an_item_not_held_is_409_and_changes_nothing(client: TestClient, pool: ConnectionPool,
                                                                database_url: str) -> None:  # fmt: skip
    truth = seed(database_url, 2)
    _, ann = make_user(pool, "ann")
    before = table_sizes(database_url)
    held = client.post("/review/claim", json={"count": 1}, headers=ann).json()[0]["id"]
    other = next(t["id"] for t in truth if t["id"] != held)
    response = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": held, "verdict": "correct"}, {"prediction_id": other, "verdict": "correct"}]})  # fmt: skip
    assert response.status_code == 409
    after = table_sizes(database_url)
    assert after["annotations"] == before["annotations"]  # all or nothing


# -- verdicts, disputes, history --------------------------------------------------------------------


def test_verdicts_corrections_disputes_and_append_only_history(
    client: TestClient, pool: ConnectionPool, database_url: str, context: ModerationContext
) -> None:
    context.overlap_share = 1.0  # every item asks for two reviews
    truth = {t["id"]: t for t in seed(database_url, 2)}
    _, ann = make_user(pool, "ann")
    _, bob = make_user(pool, "bob")
    _, boss = make_user(pool, "boss", rs.Role.ADMIN)
    first, second = sorted(truth)
    wrong = "0" if truth[first]["label"] != "0" else "1"
    for headers in (ann, bob):
        assert len(client.post("/review/claim", json={"count": 2}, headers=headers).json()) == 2
    ok = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": first, "verdict": "correct"},
        {"prediction_id": second, "verdict": "discard", "reason": "blurred"}]})  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert [s["status"] for s in ok.json()] == ["unreviewed", "unreviewed"]  # one of two reviews
    ok = client.post("/review/verdicts", headers=bob, json={"verdicts": [
        {"prediction_id": first, "verdict": "wrong", "label": wrong},
        {"prediction_id": second, "verdict": "discard", "reason": "empty"}]})  # fmt: skip
    assert [s["status"] for s in ok.json()] == ["disputed", "discarded"]
    disputed = client.get("/review/items", params={"status": "disputed"}, headers=ann).json()["items"]
    assert [i["id"] for i in disputed] == [first]
    assert client.post(f"/review/items/{first}/resolve", json={"label": wrong, "reason": "looked"},
                       headers=ann).status_code == 403  # fmt: skip
    resolved = client.post(f"/review/items/{first}/resolve", json={"label": wrong, "reason": "looked"}, headers=boss)
    assert resolved.json()["status"] == "reviewed" and resolved.json()["label"] == wrong
    history = client.get(f"/review/items/{first}/history", headers=ann).json()
    assert [(h["actor"], h["verdict"]) for h in history] == [("ann", "correct"), ("bob", "wrong"), ("boss", "resolve")]
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        conn.execute("UPDATE annotations SET label = 'x'")
    with psycopg.connect(database_url) as conn:
        current: dict[str, str] = dict(conn.execute("SELECT prediction_id::text, label FROM current_labels").fetchall())
    assert current == {first: wrong}  # the discarded item has no current label
    agreement = client.get("/review/agreement", headers=ann).json()
    assert agreement["pairs"][0]["items"] == 2
    assert [d["item"] for d in agreement["disagreements"]] == [first]


@pytest.mark.parametrize(
    ("verdict", "status"),
    [
        ({"verdict": "wrong"}, 422),  # no label
        ({"verdict": "wrong", "label": "cat"}, 422),  # not a class of the model
        ({"verdict": "correct", "label": "3"}, 422),  # only 'wrong' takes a label
        ({"verdict": "discard"}, 422),  # no reason
        ({"verdict": "approve"}, 422),
    ],
)
def test_bad_verdicts_are_refused_and_nothing_is_written(client: TestClient, pool: ConnectionPool, database_url: str,
                                                         verdict: dict[str, str], status: int) -> None:  # fmt: skip
    seed(database_url, 2)
    _, ann = make_user(pool, "ann")
    good, bad = (c["id"] for c in client.post("/review/claim", json={"count": 2}, headers=ann).json())
    before = review_rows(database_url)
    assert len(before["leases"]) == 2
    response = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": good, "verdict": "correct"}, {"prediction_id": bad, **verdict}]})  # fmt: skip
    assert response.status_code == status, response.text
    # All or none: not even the good verdict is written, and both leases are held as they were.
    assert review_rows(database_url) == before
    judged = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": good, "verdict": "correct"}, {"prediction_id": bad, "verdict": "unsure"}]})  # fmt: skip
    assert judged.status_code == 200, judged.text


def test_a_wrong_verdict_naming_the_models_own_label_is_refused(
    client: TestClient, pool: ConnectionPool, database_url: str
) -> None:
    seed(database_url, 2)
    _, ann = make_user(pool, "ann")
    first, second = client.post("/review/claim", json={"count": 2}, headers=ann).json()
    before = table_sizes(database_url)
    own = {"prediction_id": first["id"], "verdict": "wrong", "label": first["label"]}
    other = "0" if second["label"] != "0" else "1"
    response = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": second["id"], "verdict": "wrong", "label": other}, own]})  # fmt: skip
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["title"] == "Unprocessable Entity"
    assert f"{first['label']!r} is the label proposed" in problem["detail"]
    assert "'correct' verdict" in problem["detail"] and first["id"] in problem["detail"]
    assert table_sizes(database_url) == before  # all or none: nothing stored, both leases kept
    judged = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": second["id"], "verdict": "wrong", "label": other},
        {"prediction_id": first["id"], "verdict": "correct"}]})  # fmt: skip
    assert judged.status_code == 200, judged.text
    assert [(s["status"], s["label"]) for s in judged.json()] == [("reviewed", other), ("reviewed", first["label"])]


def as_stored(_model: str, sample: Any) -> tuple[bytes, str | None]:
    """The tests' models take any numbers; the sample is stored as .npy."""
    return npy_bytes(np.asarray(sample, dtype=np.float32)), None


def test_added_samples_and_erased_inputs(client: TestClient, pool: ConnectionPool, database_url: str,
                                         context: ModerationContext) -> None:  # fmt: skip
    context.to_input = as_stored
    truth = seed(database_url, 1)
    _, ann = make_user(pool, "ann")
    _, boss = make_user(pool, "boss", rs.Role.ADMIN)
    added = client.post("/review/samples", json={"input": [[1.0] * 8] * 8, "label": "7"}, headers=ann)
    assert added.status_code == 201 and added.json()["status"] == "reviewed" and added.json()["label"] == "7"
    assert client.post("/review/samples", json={"input": [[1.0] * 8] * 8, "label": "cat"},
                       headers=ann).status_code == 422  # fmt: skip
    item = truth[0]["id"]
    assert client.post(f"/review/items/{item}/erase", json={"reason": "request 12"}, headers=ann).status_code == 403
    assert client.post(f"/review/items/{item}/erase", json={"reason": "request 12"}, headers=boss).status_code == 204
    listed = {i["id"]: i for i in client.get("/review/items", headers=ann).json()["items"]}
    assert listed[item]["input_erased"] is True
    assert listed[added.json()["prediction_id"]]["source"] == "reviewer"
    audit = client.get("/review/audit", headers=boss).json()
    assert [a["action"] for a in audit[:2]] == ["input.erase", "sample.add"]
    assert client.post("/review/claim", json={"count": 5}, headers=ann).json() == []  # erased: nothing to review


def test_undo_takes_back_a_verdict_while_its_lease_would_live(
    client: TestClient, database_url: str, pool: ConnectionPool, context: ModerationContext
) -> None:
    seed(database_url, 3)
    _, ann = make_user(pool, "ann")
    _, bob = make_user(pool, "bob")
    first, second = client.post("/review/claim", json={"count": 2}, headers=ann).json()
    judged = client.post("/review/verdicts", headers=ann, json={"verdicts": [
        {"prediction_id": first["id"], "verdict": "wrong", "label": "1" if first["label"] != "1" else "2"},
        {"prediction_id": second["id"], "verdict": "correct"},
    ]})  # fmt: skip
    assert judged.status_code == 200 and [s["status"] for s in judged.json()] == ["reviewed", "reviewed"]

    undone = client.post("/review/undo", json={"prediction_id": first["id"]}, headers=ann)
    assert undone.status_code == 200, undone.text
    assert (
        undone.json()["id"] == first["id"] and undone.json()["lease_expires_at"] > judged.json()[0]["prediction_id"][:0]
    )
    history = client.get(f"/review/items/{first['id']}/history", headers=ann).json()
    assert [h["verdict"] for h in history] == ["wrong", "undo"]  # append-only: the verdict stays, withdrawn
    listed = {i["id"]: i for i in client.get("/review/items", headers=ann).json()["items"]}
    assert listed[first["id"]]["status"] == "unreviewed" and listed[second["id"]]["status"] == "reviewed"
    again = client.post("/review/undo", json={"prediction_id": first["id"]}, headers=ann)
    assert again.status_code == 409 and "nothing to undo" in again.json()["detail"]
    assert client.post("/review/undo", json={"prediction_id": second["id"]}, headers=bob).status_code == 409
    # The item is leased to the reviewer again: a new verdict is accepted without a claim.
    rejudged = client.post("/review/verdicts", headers=ann,
                           json={"verdicts": [{"prediction_id": first["id"], "verdict": "correct"}]})  # fmt: skip
    assert rejudged.status_code == 200 and rejudged.json()[0]["status"] == "reviewed"

    context.lease_seconds = 0.001  # a verdict older than a lease cannot be taken back
    time.sleep(0.01)
    late = client.post("/review/undo", json={"prediction_id": second["id"]}, headers=ann)
    assert late.status_code == 409 and "too late" in late.json()["detail"]


def test_claims_can_be_narrowed_and_show_the_top_scores(
    client: TestClient, database_url: str, pool: ConnectionPool
) -> None:
    truth = seed(database_url, 60)
    _, ann = make_user(pool, "ann")
    narrowed = {"model_version": "v2", "min_confidence": 0.5, "max_confidence": 0.8, "count": 100}
    claimed = client.post("/review/claim", json=narrowed, headers=ann).json()
    expected = {t["id"] for t in truth if t["model_version"] == "v2" and 0.5 <= t["confidence"] <= 0.8}
    assert expected and {c["id"] for c in claimed} == expected
    assert all(len(c["top"]) == 3 and c["top"][0]["score"] == pytest.approx(0.05) for c in claimed)
    label = truth[0]["label"]
    by_label = client.post("/review/claim", json={"label": label, "count": 100,
                                                   "created_to": truth[30]["created_at"].isoformat()},
                           headers=ann).json()  # fmt: skip
    assert {c["id"] for c in by_label} == {t["id"] for t in truth[:30] if t["label"] == label} - expected
    bad = client.post("/review/claim", json={"min_confidence": 2}, headers=ann)
    assert bad.status_code == 422
    counts = client.get("/review/counts", headers=ann).json()
    assert {(v["model_name"], v["model_version"]) for v in counts["per_version"]} <= {("digits-cnn", "v1"),
                                                                                   ("digits-cnn", "v2")}  # fmt: skip


# -- authorization ----------------------------------------------------------------------------------

ITEM = "01a2024d-76a5-744d-b838-fcab5ce4eb37"
ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/review/me", None, "reviewer"),
    ("GET", "/review/items", None, "reviewer"),
    ("GET", "/review/counts", None, "reviewer"),
    ("POST", "/review/claim", {"count": 1}, "reviewer"),
    ("POST", "/review/verdicts", {"verdicts": [{"prediction_id": ITEM, "verdict": "correct"}]}, "reviewer"),
    ("POST", "/review/samples", {"input": [[0] * 8] * 8, "label": "1"}, "reviewer"),
    ("GET", f"/review/items/{ITEM}/history", None, "reviewer"),
    ("GET", "/review/agreement", None, "reviewer"),
    ("POST", "/review/undo", {"prediction_id": ITEM}, "reviewer"),
    ("POST", f"/review/items/{ITEM}/resolve", {"label": "1", "reason": "x"}, "admin"),
    ("POST", f"/review/items/{ITEM}/erase", {"reason": "x"}, "admin"),
    ("GET", "/review/audit", None, "admin"),
    ("GET", "/review/users", None, "admin"),
    ("POST", "/review/users", {"name": "carol"}, "admin"),
]


@pytest.mark.parametrize(("method", "path", "body", "needs"), ROUTES, ids=[f"{r[0]} {r[1]}" for r in ROUTES])
def test_authorization_matrix(client: TestClient, pool: ConnectionPool, context: ModerationContext, method: str,
                              path: str, body: dict[str, Any] | None, needs: str) -> None:  # fmt: skip
    context.to_input = as_stored
    _, reviewer = make_user(pool, "rev")
    _, admin = make_user(pool, "adm", rs.Role.ADMIN)
    callers: dict[str, dict[str, str]] = {
        "none": {}, "bad": {"Authorization": "Bearer not-a-token"}, "basic": {"Authorization": "Basic YTpi"},
        "reviewer": reviewer, "admin": admin,
    }  # fmt: skip
    for who, headers in callers.items():
        status = client.request(method, path, json=body, headers=headers).status_code
        if who in ("none", "bad", "basic"):
            assert status == 401, (who, status)
        elif who == "reviewer" and needs == "admin":
            assert status == 403, (who, status)
        else:
            # Allowed: the answer is about the request (e.g. 404 unknown item, 409 no lease), never 401/403/5xx.
            assert status not in (401, 403) and status < 500, (who, status)


# -- filters and pagination -------------------------------------------------------------------------


def all_pages(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    items, cursor = [], None
    while True:
        response = client.get("/review/items", params={**params, "limit": 13, **({"cursor": cursor} if cursor else {})},
                              headers=headers)  # fmt: skip
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_filters_match_a_brute_force_query(client: TestClient, pool: ConnectionPool, database_url: str) -> None:
    truth = seed(database_url, 120)
    ann_user, ann = make_user(pool, "ann")
    claimed = client.post("/review/claim", json={"count": 40, "strategy": "least_confident"}, headers=ann).json()
    lowest = sorted(truth, key=lambda t: (t["confidence"], t["created_at"]))[:40]
    assert [c["id"] for c in claimed] == [t["id"] for t in lowest]
    verdicts = [{"prediction_id": c["id"], "verdict": "correct"} for c in claimed[:25]] + [
        {"prediction_id": c["id"], "verdict": "wrong", "label": "0" if c["label"] != "0" else "1"} for c in claimed[25:]
    ]
    assert client.post("/review/verdicts", json={"verdicts": verdicts}, headers=ann).status_code == 200
    reviewed = {v["prediction_id"]: v.get("label") or next(c["label"] for c in claimed if c["id"] == v["prediction_id"])
                for v in verdicts}  # fmt: skip
    mid = T0 + timedelta(minutes=50)
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"from": mid.isoformat()}, lambda t: t["created_at"] >= mid),
        ({"to": mid.isoformat()}, lambda t: t["created_at"] < mid),
        ({"model_version": "v2"}, lambda t: t["model_version"] == "v2"),
        ({"model_name": "digits-cnn"}, lambda t: True),
        ({"model_name": "other"}, lambda t: False),
        ({"label": "4"}, lambda t: t["label"] == "4"),
        ({"min_confidence": 0.5}, lambda t: t["confidence"] >= 0.5),
        ({"max_confidence": 0.6}, lambda t: t["confidence"] <= 0.6),
        ({"status": "reviewed"}, lambda t: t["id"] in reviewed),
        ({"status": "unreviewed"}, lambda t: t["id"] not in reviewed),
        ({"reviewed_label": "0"}, lambda t: reviewed.get(t["id"]) == "0"),
        ({"reviewer": "ann"}, lambda t: t["id"] in reviewed),
        ({"reviewer": "nobody"}, lambda t: False),
        ({"model_version": "v1", "min_confidence": 0.4, "max_confidence": 0.9, "from": mid.isoformat()},
         lambda t: t["model_version"] == "v1" and 0.4 <= t["confidence"] <= 0.9 and t["created_at"] >= mid),
        ({"status": "reviewed", "label": "2", "to": mid.isoformat()},
         lambda t: t["id"] in reviewed and t["label"] == "2" and t["created_at"] < mid),
    ]  # fmt: skip
    for params, keep in cases:
        for sort, order in (("time", "asc"), ("confidence", "desc")):
            got = all_pages(client, ann, sort=sort, order=order, **params)
            ids = [g["id"] for g in got]
            expected = [t for t in truth if keep(t)]
            key = (lambda t: (t["created_at"], t["id"])) if sort == "time" else (
                lambda t: (t["confidence"], t["created_at"], t["id"]))  # fmt: skip
            expected.sort(key=key, reverse=order == "desc")
            assert ids == [t["id"] for t in expected], (params, sort)
    assert ann_user.name == "ann"


def test_pagination_visits_every_row_once_while_predictions_arrive(client: TestClient, pool: ConnectionPool,
                                                                   database_url: str) -> None:  # fmt: skip
    truth = seed(database_url, 60)
    _, ann = make_user(pool, "ann")
    for order in ("asc", "desc"):
        seen: list[str] = []
        cursor = None
        batch = 0
        while True:
            params: dict[str, Any] = {"limit": 7, "order": order, **({"cursor": cursor} if cursor else {})}
            page = client.get("/review/items", params=params, headers=ann).json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["next_cursor"]
            batch += 1
            # New predictions keep arriving, later than everything already there.
            seed(database_url, 3, start=T0 + timedelta(days=1, hours=batch), seed_=batch)
            if cursor is None:
                break
        assert len(seen) == len(set(seen))
        assert {t["id"] for t in truth} <= set(seen)


HOSTILE = [
    {"label": "'; DROP TABLE predictions; --"},
    {"model_name": "x' OR '1'='1"},
    {"reviewer": "ann' --"},
    {"min_confidence": "1e309"},
    {"min_confidence": "NaN"},
    {"max_confidence": "-5"},
    {"limit": "100000000000000000000"},
    {"limit": "-1"},
    {"from": "yesterday"},
    {"status": "everything"},
    {"sort": "id; DELETE FROM users"},
    {"cursor": "not-base64!"},
    {"cursor": "W251bGwsICIyMDI2IiwgIngiXQ=="},
    {"order": "sideways"},
    {"label": "\x00"},
    {"model_version": "a" * 5000},
]


@pytest.mark.parametrize("params", HOSTILE, ids=[str(h)[:40] for h in HOSTILE])
def test_hostile_filters_get_422_or_nothing_and_change_nothing(
    client: TestClient, pool: ConnectionPool, database_url: str, params: dict[str, str]
) -> None:
    seed(database_url, 5)
    _, ann = make_user(pool, "ann")
    before = table_sizes(database_url)
    response = client.get("/review/items", params=params, headers=ann)
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json()["items"] == []
    assert table_sizes(database_url) == before


def test_counts(client: TestClient, pool: ConnectionPool, database_url: str) -> None:
    truth = seed(database_url, 30, step_s=3600)  # 30 hours: two days
    _, ann = make_user(pool, "ann")
    claimed = client.post("/review/claim", json={"count": 4}, headers=ann).json()
    wrong = "0" if claimed[3]["label"] != "0" else "1"
    verdicts = [{"prediction_id": c["id"], "verdict": "correct"} for c in claimed[:2]] + [
        {"prediction_id": claimed[2]["id"], "verdict": "discard", "reason": "noise"},
        {"prediction_id": claimed[3]["id"], "verdict": "wrong", "label": wrong},
    ]
    client.post("/review/verdicts", json={"verdicts": verdicts}, headers=ann)
    body = client.get("/review/counts", headers=ann).json()
    assert body["moderated"] == 4 and body["unmoderated"] == 26
    assert body["verdicts"] == {"correct": 2, "corrected": 1, "discarded": 1, "disputed": 0}
    assert body["accuracy_by_reviewers"] == pytest.approx(2 / 3)
    days = {(r["model_version"], r["day"]) for r in body["per_model_day"]}
    expected_days = {(t["model_version"], t["created_at"].date().isoformat()) for t in truth}
    assert days == expected_days
    windowed = client.get("/review/counts", params={"from": (T0 + timedelta(hours=24)).isoformat()}, headers=ann)
    assert windowed.json()["moderated"] + windowed.json()["unmoderated"] == 6


def test_counts_of_one_model(client: TestClient, pool: ConnectionPool, database_url: str) -> None:
    digits = seed(database_url, 12, step_s=3600)
    shapes = seed(database_url, 5, start=T0 + timedelta(minutes=1), step_s=7200, seed_=1, model_name="shapes-cnn")
    _, ann = make_user(pool, "ann")
    claimed = client.post("/review/claim", json={"count": 17}, headers=ann).json()
    assert len(claimed) == 17
    # Every digits item judged correct but one (corrected); every shapes item but the last discarded.
    verdicts: list[dict[str, Any]] = []
    for c in claimed:
        if c["model_name"] == "digits-cnn":
            verdicts.append({"prediction_id": c["id"], "verdict": "correct"})
        elif c["id"] != shapes[-1]["id"]:
            verdicts.append({"prediction_id": c["id"], "verdict": "discard", "reason": "not a shape"})
    verdicts[0] = {"prediction_id": verdicts[0]["prediction_id"], "verdict": "wrong",
                   "label": "0" if claimed[0]["label"] != "0" else "1"}  # fmt: skip
    assert claimed[0]["model_name"] == "digits-cnn"
    assert client.post("/review/verdicts", json={"verdicts": verdicts}, headers=ann).status_code == 200

    everything = client.get("/review/counts", headers=ann).json()
    assert (everything["moderated"], everything["unmoderated"]) == (16, 1)
    of_digits = client.get("/review/counts", params={"model": "digits-cnn"}, headers=ann)
    assert of_digits.status_code == 200, of_digits.text
    body = of_digits.json()
    assert (body["moderated"], body["unmoderated"]) == (12, 0)
    assert body["verdicts"] == {"correct": 11, "corrected": 1, "discarded": 0, "disputed": 0}
    assert body["accuracy_by_reviewers"] == pytest.approx(11 / 12)
    assert {r["model_name"] for r in body["per_model_day"]} == {"digits-cnn"}
    assert {(v["model_name"], v["model_version"]) for v in body["per_version"]} == {
        ("digits-cnn", t["model_version"]) for t in digits
    }
    of_shapes = client.get("/review/counts", params={"model": "shapes-cnn"}, headers=ann).json()
    assert (of_shapes["moderated"], of_shapes["unmoderated"]) == (4, 1)
    assert of_shapes["verdicts"] == {"correct": 0, "corrected": 0, "discarded": 4, "disputed": 0}
    assert of_shapes["accuracy_by_reviewers"] is None and of_shapes["per_version"] == []
    assert {r["model_name"] for r in of_shapes["per_model_day"]} == {"shapes-cnn"}
    windowed = client.get("/review/counts", params={"model": "shapes-cnn", "to": (T0 + timedelta(hours=3)).isoformat()},
                          headers=ann).json()  # fmt: skip
    assert windowed["moderated"] + windowed["unmoderated"] == 2  # 0:01 and 2:01
    nobody = client.get("/review/counts", params={"model": "no-such-model"}, headers=ann).json()
    assert (nobody["moderated"], nobody["unmoderated"], nobody["per_model_day"]) == (0, 0, [])
    for hostile in ("\x00", "a" * 201):  # the same checks as /review/items' model_name
        refused = client.get("/review/counts", params={"model": hostile}, headers=ann)
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
        assert client.get("/review/items", params={"model_name": hostile}, headers=ann).status_code == 422


def test_the_review_page_is_served_and_its_script_parses(client: TestClient, tmp_path: Any) -> None:
    import re
    import shutil
    import subprocess

    response = client.get("/review/ui")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for route in ("/review/claim", "/review/verdicts", "/review/counts", "/models"):
        assert route in page
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not syntax-checked")
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    path = tmp_path / "review.js"
    path.write_text(script)
    checked = subprocess.run([node, "--check", str(path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


# -- hostile bodies: the caller first, never a 500 ---------------------------------------------------

BODY_ROUTES = [r for r in ROUTES if r[2] is not None]


@pytest.mark.parametrize(("method", "path", "body", "needs"), BODY_ROUTES, ids=[r[1] for r in BODY_ROUTES])
@pytest.mark.parametrize("junk", [b"{not json", b"[]", b'"text"'])
def test_junk_bodies_meet_the_callers_check_before_validation(
    client: TestClient, pool: ConnectionPool, method: str, path: str, body: Any, needs: str, junk: bytes
) -> None:
    _, reviewer = make_user(pool, "rev")
    _, admin = make_user(pool, "adm", rs.Role.ADMIN)
    json_type = {"content-type": "application/json"}
    assert client.request(method, path, content=junk, headers=json_type).status_code == 401
    assert (
        client.request(method, path, content=junk, headers={**json_type, "Authorization": "Bearer x"}).status_code
        == 401
    )
    as_reviewer = client.request(method, path, content=junk, headers={**json_type, **reviewer}).status_code
    assert as_reviewer == (403 if needs == "admin" else 422)
    assert client.request(method, path, content=junk, headers={**json_type, **admin}).status_code == 422


@pytest.mark.parametrize(
    ("path", "body", "role"),
    [
        ("/review/claim", b'{"count": 1, "lease_seconds": NaN}', rs.Role.REVIEWER),
        ("/review/claim", b'{"count": Infinity}', rs.Role.REVIEWER),
        ("/review/verdicts", b'{"verdicts": NaN}', rs.Role.REVIEWER),
        ("/review/verdicts", b'{"verdicts": [{"prediction_id": -Infinity, "verdict": "correct"}]}', rs.Role.REVIEWER),
        ("/review/samples", b'{"input": NaN, "label": "1"}', rs.Role.REVIEWER),
        ("/review/users", b'{"name": NaN}', rs.Role.ADMIN),
    ],
)
def test_non_finite_numbers_in_a_body_get_422_not_500(
    client: TestClient, pool: ConnectionPool, path: str, body: bytes, role: rs.Role
) -> None:
    _, headers = make_user(pool, "caller", role)
    response = client.post(path, content=body, headers={**headers, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["message"] and response.json()["errors"][0]["field"]
    assert "NaN" not in response.text and "Infinity" not in response.text  # the input is not echoed


def _cursor(key: Any) -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "W251bGwsIjIwMjAtMDEtMDFUMDA6MDA6MDArMDA6MDAiLDVd",  # [null, "2020-01-01T00:00:00+00:00", 5]
        _cursor([None, 5, "01a2024d-76a5-744d-b838-fcab5ce4eb37"]),
        _cursor([None, "2020-01-01T00:00:00", "01a2024d-76a5-744d-b838-fcab5ce4eb37"]),  # no time zone
        _cursor(["high", "2020-01-01T00:00:00+00:00", "01a2024d-76a5-744d-b838-fcab5ce4eb37"]),
        _cursor([True, "2020-01-01T00:00:00+00:00", "01a2024d-76a5-744d-b838-fcab5ce4eb37"]),
        _cursor({"a": 1, "b": 2, "c": 3}),
        _cursor("abc"),
        _cursor(7),
        "not base64 at all!",
    ],
)
def test_a_forged_cursor_gets_422(client: TestClient, pool: ConnectionPool, cursor: str) -> None:
    _, headers = make_user(pool, "rev")
    response = client.get("/review/items", params={"cursor": cursor}, headers=headers)
    assert response.status_code == 422, response.text
    assert "cursor is not one this API gave out" in response.text


def test_user_names_are_normalised_so_none_looks_like_another(client: TestClient, pool: ConnectionPool) -> None:
    _, admin = make_user(pool, "adm", rs.Role.ADMIN)
    assert client.post("/review/users", json={"name": "r1"}, headers=admin).status_code == 201
    assert client.post("/review/users", json={"name": "R1"}, headers=admin).status_code == 409  # stored lower-case
    created = client.post("/review/users", json={"name": "Carol.Smith"}, headers=admin)
    assert created.status_code == 201 and created.json()["name"] == "carol.smith"
    # The API takes the schema's ASCII names only: fullwidth look-alikes and padding are refused.
    for bad in ("\uff52\uff11", " r1 ", "   ", "", "a b", "-x", "x-", "r\u0430", "a\x00b", "x" * 65):
        response = client.post("/review/users", json={"name": bad}, headers=admin)
        assert response.status_code == 422, (bad, response.text)
    names = [u["name"] for u in client.get("/review/users", headers=admin).json()]
    assert sorted(names) == ["adm", "carol.smith", "r1"]


def test_tokens_are_never_logged_nor_stored(
    client: TestClient, pool: ConnectionPool, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    seed(database_url, 3)
    _, admin = make_user(pool, "boss", rs.Role.ADMIN)
    with caplog.at_level("DEBUG"):
        created = client.post("/review/users", json={"name": "carol"}, headers=admin)
        token = created.json()["token"]
        mine = {"Authorization": f"Bearer {token}"}
        claimed = client.post("/review/claim", json={"count": 1}, headers=mine).json()
        client.post("/review/verdicts", json={"verdicts": [{"prediction_id": claimed[0]["id"], "verdict": "correct"}]},
                    headers=mine)  # fmt: skip
        client.get("/review/me", headers={"Authorization": f"Bearer {token}x"})  # a wrong one, refused
    assert created.status_code == 201 and len(token) >= 40
    assert not [r for r in caplog.records if token in r.getMessage()]
    with psycopg.connect(database_url) as conn:
        dump = " ".join(str(row) for t in ("users", "audit_log") for row in conn.execute(f"SELECT * FROM {t}"))
    assert token not in dump
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT token_hash FROM users WHERE name = 'carol'").fetchone()
    assert stored is not None and bytes(stored[0]) == rs.hash_token(token)  # only the hash is kept


def test_every_review_and_admin_operation_documents_its_errors_as_problem_details() -> None:
    from service.routes.admin import router as admin_router

    app = FastAPI()
    app.include_router(router)
    app.include_router(admin_router)
    operations = [(m, p, op) for p, ops in app.openapi()["paths"].items() for m, op in ops.items()]
    assert len(operations) >= 20
    for method, path, op in operations:
        for status in ("401", "403", "404", "409", "413", "422", "503"):
            content = op["responses"][status]["content"]
            assert list(content) == ["application/problem+json"], (method, path, status)
            assert set(content["application/problem+json"]["schema"]["required"]) == {"title", "status", "detail"}


def test_a_reviewer_holds_at_most_the_lease_limit(
    client: TestClient, context: ModerationContext, pool: ConnectionPool, database_url: str
) -> None:
    seed(database_url, 20)
    context.max_leases = 7
    _, alice = make_user(pool, "alice")
    assert len(client.post("/review/claim", json={"count": 5}, headers=alice).json()) == 5
    second = client.post("/review/claim", json={"count": 5}, headers=alice).json()
    assert len(second) == 2  # up to the limit, not beyond
    refused = client.post("/review/claim", json={"count": 1}, headers=alice)
    assert refused.status_code == 409 and "live leases" in refused.json()["detail"]
    judged = [{"prediction_id": item["id"], "verdict": "correct"} for item in second]
    assert client.post("/review/verdicts", json={"verdicts": judged}, headers=alice).status_code == 200
    assert len(client.post("/review/claim", json={"count": 5}, headers=alice).json()) == 2  # freed by judging


def test_a_reviewer_can_neither_see_nor_act_on_another_reviewers_leases(
    client: TestClient, pool: ConnectionPool, database_url: str
) -> None:
    seed(database_url, 6)
    _, alice = make_user(pool, "alice")
    _, bob = make_user(pool, "bob")
    held = {item["id"] for item in client.post("/review/claim", json={"count": 4}, headers=alice).json()}
    assert len(held) == 4
    theirs = {item["id"] for item in client.post("/review/claim", json={"count": 10}, headers=bob).json()}
    assert theirs and not theirs & held  # bob is given only what alice does not hold
    one = next(iter(held))
    acted = client.post("/review/verdicts", json={"verdicts": [{"prediction_id": one, "verdict": "correct"}]},
                        headers=bob)  # fmt: skip
    assert acted.status_code == 409 and "no live lease" in acted.json()["detail"]
    assert client.post("/review/undo", json={"prediction_id": one}, headers=bob).status_code == 409
    listed = client.get("/review/items", headers=bob).json()["items"]
    assert {i["id"] for i in listed} >= held and not any("lease" in key for i in listed for key in i)
    assert [h["verdict"] for h in client.get(f"/review/items/{one}/history", headers=alice).json()] == []
