"""`loop serve` (which runs `bentoml serve`) in a subprocess, over real HTTP."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from feedback.champion import Decision, record_promotion
from models import digits
from models.pipeline import BuildResult
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

CONCURRENCY = 64


def histogram(metrics_text: str, name: str) -> dict[str, float]:
    """Cumulative bucket counts of one Prometheus histogram, summed over label sets."""
    buckets: dict[str, float] = {}
    for match in re.finditer(rf'^{name}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', metrics_text, re.M):
        buckets[match.group(1)] = buckets.get(match.group(1), 0.0) + float(match.group(2))
    return buckets


def test_concurrent_requests_are_answered_and_batched(
    start_service: Callable[..., RunningService], trained_model: BuildResult
) -> None:
    service = start_service()
    data = digits.load()
    barrier = threading.Barrier(CONCURRENCY)

    def client(i: int) -> list[dict[str, object]]:
        answers = []
        with httpx.Client(base_url=service.url, timeout=30) as http:
            http.get("/livez")  # open the connection before the burst
            for round_ in range(3):
                barrier.wait()
                k = (i * 3 + round_) % len(data.labels)
                response = http.post("/predict", json={"samples": [data.images[k].tolist()]})
                assert response.status_code == 200, response.text
                (answer,) = response.json()["predictions"]
                answer["expected"] = str(data.labels[k])
                answers.append(answer)
        return answers

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = [a for batch in pool.map(client, range(CONCURRENCY)) for a in batch]

    assert len(answers) == CONCURRENCY * 3
    assert len({a["id"] for a in answers}) == len(answers)
    assert all(uuid.UUID(str(a["id"])).version == 7 for a in answers)
    assert sum(a["label"] == a["expected"] for a in answers) / len(answers) >= 0.95
    assert {a["model_version"] for a in answers} == {trained_model.stored.version}

    buckets = histogram(httpx.get(f"{service.url}/metrics").text, "loop_batch_size")
    total, single = buckets["+Inf"], buckets["1.0"]
    assert total < len(answers), "every request ran in a model call of its own"
    assert single < total, f"no batch was larger than one sample: {buckets}"


def test_probes_say_not_ready_until_the_model_is_loaded(
    start_service: Callable[..., RunningService], trained_model: BuildResult, database_url: str
) -> None:
    stored = trained_model.stored
    with psycopg.connect(database_url, autocommit=True) as conn:
        record_promotion(
            conn=conn, model_name=stored.name, model_version=stored.version, decision=Decision.FORCED, reason="test"
        )
    with psycopg.connect(database_url) as lock:
        # The worker reads its champion before it loads a model: while this lock is held, it cannot.
        lock.execute("LOCK TABLE promotions IN ACCESS EXCLUSIVE MODE")
        service = start_service(wait_ready=False, via_cli=False, LOOP_MODEL_TAG="champion")
        with httpx.Client(base_url=service.url, timeout=10) as http:
            for _ in range(5):
                assert http.get("/livez").status_code == 200
                assert http.get("/readyz").status_code == 503
                models = http.get("/models")
                assert models.status_code == 503 and "still loading" in models.json()["detail"]
                time.sleep(0.2)
        lock.rollback()
    with httpx.Client(base_url=service.url, timeout=10) as http:
        deadline = time.monotonic() + 60
        while (status := http.get("/readyz").status_code) != 200:
            assert status == 503, status
            assert time.monotonic() < deadline, "never ready once the model could load"
            time.sleep(0.1)
        assert http.get("/livez").status_code == 200
        assert http.get(f"/models/{stored.name}").json()["version"] == stored.version
        response = http.post("/predict", json={"samples": [[[1.0] * 8] * 8]})
        assert response.status_code == 200, response.text


def test_not_ready_without_a_model_and_says_why(start_service: Callable[..., RunningService]) -> None:
    service = start_service(wait_ready=False, via_cli=False, LOOP_MODEL_NAME="absent-model")
    with httpx.Client(base_url=service.url, timeout=10) as http:
        assert http.get("/livez").status_code == 200
        assert http.get("/readyz").status_code == 503
        response = http.post("/predict", json={"samples": [[[1.0] * 8] * 8]})
        assert response.status_code == 503
        assert "absent-model" in response.json()["detail"]
        assert http.get("/models").status_code == 503


def test_bentoml_build_packs_the_service_and_the_model(trained_model: BuildResult) -> None:
    from pathlib import Path

    import bentoml

    root = Path(__file__).resolve().parents[2]
    bento = bentoml.bentos.build_bentofile(str(root / "bentofile.yaml"), build_ctx=str(root))
    try:
        assert bento.info.entry_service == "loop"
        assert [str(m.tag) for m in bento.info.all_models] == [trained_model.stored.tag]
        assert (Path(bento.path) / "src" / "service" / "app.py").exists()
        assert list((Path(bento.path) / "src" / "feedback" / "migrations").glob("*.sql"))
        assert (Path(bento.path) / "src" / "service" / "static" / "review.html").exists()
        assert not (Path(bento.path) / "src" / "tests").exists()
    finally:
        bentoml.bentos.delete(str(bento.tag))
