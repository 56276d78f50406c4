"""Two replicas of the service, each its own `loop serve` (service and ingest worker) on its own
port, on one Postgres and one Redis, as a load balancer would spread a team over them: predictions
and reviewers on both at once lose and double nothing, one review queue leases each item to one
reviewer, a promotion made through one replica is followed by both, and a replica killed in the
middle of traffic loses nothing it answered."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from feedback import review as rs
from harness import kill
from models.pipeline import BuildResult
from tests.integration.conftest import RunningService
from tests.integration.test_faults import Traffic, assert_exactly_once, stored, wait_until_stored
from tests.integration.test_hot_reload import two_versions

pytestmark = pytest.mark.integration

ROUNDS = 6  # claims of 20 by each reviewer


def review_through(url: str, token: str, claimed: list[str], errors: list[str]) -> None:
    """Claim and judge through one replica until the rounds are done or the queue is empty; a 503
    (the replica busy) is tried again after its Retry-After, as a client does; anything else is an error."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        try:
            for _ in range(ROUNDS):
                items = _answered(http, "/review/claim", {"count": 20}, errors)
                if not items:
                    return
                claimed += [i["id"] for i in items]
                verdicts = [{"prediction_id": i["id"], "verdict": "correct"} for i in items]
                _answered(http, "/review/verdicts", {"verdicts": verdicts}, errors)
        except httpx.HTTPError as e:
            errors.append(f"{type(e).__name__}: {e}")


def _answered(http: httpx.Client, path: str, body: dict[str, object], errors: list[str]) -> Any:
    for _ in range(10):
        answer = http.post(path, json=body)
        if answer.status_code != 503:
            break
        time.sleep(float(answer.headers.get("Retry-After", "1")))
    if answer.status_code != 200:
        errors.append(f"{path}: {answer.status_code} {answer.text}")
        return None
    return answer.json()


def served_version(service: RunningService, name: str) -> str:
    return str(httpx.get(f"{service.url}/models/{name}", timeout=10).json()["version"])


def test_two_replicas_share_one_log_one_queue_and_one_champion(
    start_service: Callable[..., RunningService], trained_model: BuildResult, database_url: str, tmp_path: Path
) -> None:
    old, new = two_versions(trained_model.stored, tmp_path, database_url, "replicas")
    name = old.name
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, admin = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
        tokens = [rs.create_user(conn=conn, name=n, role=rs.Role.REVIEWER)[1] for n in ("alice", "bob")]
    env = {"LOOP_MODEL_NAME": name, "LOOP_MODEL_TAG": "champion", "LOOP_REVIEW_OVERLAP_SHARE": "0",
           "LOOP_INGEST_CLAIM_IDLE_MS": "1000"}  # fmt: skip
    replicas = [start_service(**env), start_service(**env)]  # each with its own ingest worker

    # Predictions on both replicas at once; then two reviewers, each through a replica of their own.
    traffic = [Traffic(r.url, threads=3) for r in replicas]
    senders = [t.in_background(1000) for t in traffic]
    for sender in senders:
        sender.join(timeout=120)
    first = traffic[0].ids + traffic[1].ids
    assert not traffic[0].failures and not traffic[1].failures and len(first) == 2000
    assert_exactly_once(first, wait_until_stored(database_url, first))
    claimed: list[list[str]] = [[], []]
    errors: list[str] = []
    reviewers = [
        threading.Thread(target=review_through, args=(r.url, token, mine, errors))
        for r, token, mine in zip(replicas, tokens, claimed, strict=True)
    ]
    for thread in reviewers:
        thread.start()
    for thread in reviewers:
        thread.join(timeout=120)
    assert not errors
    assert len(claimed[0]) == len(claimed[1]) == ROUNDS * 20
    assert not set(claimed[0]) & set(claimed[1])  # no item leased to both, though through two replicas
    with psycopg.connect(database_url) as conn:
        kept = conn.execute("SELECT count(*), count(DISTINCT prediction_id) FROM annotations").fetchone()
    assert kept == (2 * ROUNDS * 20, 2 * ROUNDS * 20)  # every verdict kept, one an item

    # A promotion through one replica is followed by both within seconds.
    promoted = httpx.post(
        f"{replicas[0].url}/admin/models/{new.version}/promote", params={"model": name},
        json={"reason": "replicas test"}, headers={"Authorization": f"Bearer {admin}"}, timeout=30,
    )  # fmt: skip
    assert promoted.status_code == 200, promoted.text
    started = time.monotonic()
    while {served_version(r, name) for r in replicas} != {new.version}:
        assert time.monotonic() - started < 15, "both replicas did not follow the promotion"
        time.sleep(0.2)

    # One replica killed in the middle of traffic: what either answered is stored, once.
    traffic = [Traffic(r.url, threads=3) for r in replicas]
    senders = [t.in_background(3000) for t in traffic]
    deadline = time.monotonic() + 60
    while len(stored(database_url)) < len(first) + 500:
        assert time.monotonic() < deadline, "the replicas stored nothing more"
        time.sleep(0.05)
    kill(replicas[0].process)  # kill -9 of its service, workers and ingest worker
    for sender in senders:
        sender.join(timeout=180)
    assert not traffic[1].failures and len(traffic[1].ids) == 3000
    assert traffic[0].ids and traffic[0].failures  # the killed replica answered some, then none
    answered = first + traffic[0].ids + traffic[1].ids
    in_postgres = wait_until_stored(database_url, answered)
    assert len(in_postgres) == len(set(in_postgres))  # nothing doubled
    assert not set(answered) - set(in_postgres), "answered predictions were lost"
    # What the killed replica logged for requests whose answers the kill cut off may be stored too:
    # at most its clients' requests in flight (3 threads x 10 samples).
    assert len(set(in_postgres) - set(answered)) <= 30
