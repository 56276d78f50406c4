"""A promotion swaps every worker to the new model under continuous traffic, failing no request."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
import redis

from feedback import champion as dataset_store
from feedback.champion import Decision, announce
from feedback.keys import Keys
from models import digits, store
from models.pipeline import BuildResult
from tests.conftest import REDIS
from tests.graphs import linear_classifier
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

CLIENTS = 6
WORKERS = 2


def test_promotion_swaps_every_worker_once_without_failing_a_request(
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    database_url: str,
    keys: Keys,
    tmp_path: Path,
) -> None:
    old, new = two_versions(trained_model.stored, tmp_path, database_url, "reload")
    name = old.name
    service = start_service(
        via_cli=False,
        LOOP_MODEL_NAME=name,
        LOOP_MODEL_TAG="champion",
        BENTOML_CONFIG_OPTIONS=f"services.loop.workers={WORKERS}",
    )
    assert httpx.get(f"{service.url}/models/{name}").json()["version"] == old.version

    sample = digits.load().images[0].tolist()
    answers: list[tuple[str, str, str]] = []  # (worker, prediction id, model version)
    scores: dict[str, list[dict[str, float]]] = defaultdict(list)  # by the version answers name
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            # A new connection now and then: the kernel spreads connections, not requests, over workers.
            with httpx.Client(base_url=service.url, timeout=30) as http:
                for _ in range(10):
                    try:
                        response = http.post("/predict", json={"samples": [sample]})
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text}")
                        continue
                    (p,) = response.json()["predictions"]
                    answers.append((response.headers["x-loop-worker"], p["id"], p["model_version"]))
                    scores[p["model_version"]].append(p["scores"])

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len({w for w, _, _ in answers}) == WORKERS and len(answers) > 200, "traffic on every worker")
        client_ = redis.Redis.from_url(REDIS)
        with psycopg.connect(database_url, autocommit=True) as conn, client_:
            dataset_store.record_promotion(
                conn=conn, model_name=name, model_version=new.version, decision=Decision.PROMOTED, reason="test"
            )
            announce(client_, keys, name, new.version)
        promoted_at = len(answers)

        def every_worker_swapped() -> bool:
            later = answers[promoted_at:]
            return {w for w, _, v in later if v == new.version} == {w for w, _, _ in answers}

        _wait(every_worker_swapped, "every worker answering with the new version")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert failures == []
    assert_every_worker_swapped_once(answers, old=old.version, new=new.version)
    assert httpx.get(f"{service.url}/models/{name}").json()["version"] == new.version
    assert_sessions_swapped_with_versions(scores, old=old.version, new=new.version)


def assert_every_worker_swapped_once(answers: list[tuple[str, str, str]], *, old: str, new: str) -> None:
    by_worker: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for worker, prediction_id, version in answers:
        by_worker[worker].append((prediction_id, version))
    assert len(by_worker) == WORKERS
    for worker, seen in by_worker.items():
        # Ids of one worker increase with time: in id order, its versions go old → new exactly once.
        runs = [version for version, _ in groupby(v for _, v in sorted(seen))]
        assert runs == [old, new], f"{worker}: {runs}"


def another_model(path: Path, card: store.ModelCard) -> Path:
    """A model of the card's signature that is nearly unsure of everything, where the trained
    model is sure: its answers show which session made them, whatever version they name."""
    signature = card.signature
    return linear_classifier(
        path, input_name=signature.input_name, input_dims=["batch", *signature.input_shape],
        output_name=signature.output_name, classes=len(signature.class_names),
        features=int(np.prod(signature.input_shape)), weight_scale=1e-3,
        softmax=card.model_spec.output_kind == "probabilities",
    )  # fmt: skip


def two_versions(
    trained: store.StoredModel, folder: Path, database_url: str, prefix: str
) -> tuple[store.StoredModel, store.StoredModel]:
    """A new model of two stored versions: the trained model's file, its champion, and then
    `another_model` of the same card (not promoted)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    old = store.save(name, trained.onnx_path, trained.card)
    new = store.save(name, another_model(folder / f"{name}.onnx", trained.card), trained.card)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The champion, not the newest version, is what a worker loads on start.
        dataset_store.record_promotion(
            conn=conn, model_name=name, model_version=old.version, decision=Decision.FORCED, reason="test"
        )
    return old, new


def assert_sessions_swapped_with_versions(scores: dict[str, list[dict[str, float]]], *, old: str, new: str) -> None:
    """Every answer naming a version carries that version's model's scores (the sample is always the same)."""
    first = {version: seen[0] for version, seen in scores.items()}
    assert set(first) == {old, new}
    assert max(abs(first[old][c] - first[new][c]) for c in first[old]) > 0.5, "the two models answer alike"
    for version, seen in scores.items():
        assert all(max(abs(s[c] - first[version][c]) for c in s) < 1e-3 for s in seen), f"{version}: mixed answers"


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
