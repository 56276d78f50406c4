"""A shadow through the real service: started over the admin API, followed by every worker, fed by
every face after the answer, stored beside the answers, and changing none of them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest

from feedback import review as rs
from models import digits
from models.npy import npy_bytes
from models.pipeline import BuildResult
from tests.integration.conftest import RunningService
from tests.integration.test_hot_reload import two_versions

pytestmark = pytest.mark.integration


UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
VARYING = {"date", "x-loop-worker"}  # the time, and which worker answered


def as_sent(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """An answer as the client read it, byte for byte, with the prediction ids (new in every
    answer) masked, and the headers that say when and which worker left out."""
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in VARYING]
    return response.status_code, headers, UUID.sub(b"<id>", response.content)


def every_face(url: str, name: str, images: np.ndarray) -> list[tuple[int, list[tuple[str, str]], bytes]]:
    """The same samples through every face the model has (JSON, .npy, v2 JSON), one request id each."""
    input_name = httpx.get(f"{url}/v2/models/{name}", timeout=10).json()["inputs"][0]["name"]
    tensor = {"name": input_name, "shape": [1, 8, 8], "datatype": "FP32", "data": images[0].ravel().tolist()}
    sent = [
        httpx.post(f"{url}/predict", json={"samples": [image.tolist()]}, headers={"x-request-id": f"json-{i}"},
                   timeout=30)
        for i, image in enumerate(images)
    ] + [
        httpx.post(f"{url}/predict/npy", content=npy_bytes(images[:2].astype(np.float32)),
                   headers={"x-request-id": "npy"}, timeout=30),
        httpx.post(f"{url}/v2/models/{name}/infer", json={"id": "v2", "inputs": [tensor]}, timeout=30),
    ]  # fmt: skip
    assert all(r.status_code == 200 for r in sent), [r.text for r in sent if r.status_code != 200]
    return [as_sent(r) for r in sent]


def without_ids(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """An answer's predictions as a client reads them, less the ids that every answer makes anew."""
    return [{k: v for k, v in p.items() if k != "id"} for p in answer["predictions"]]


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = 60, on_timeout: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{on_timeout()[-6000:]}"
        time.sleep(0.2)


def test_a_shadow_sees_every_face_changes_no_answer_and_is_stored_beside_the_answers(
    start_service: Callable[..., RunningService], trained_model: BuildResult, database_url: str, tmp_path: Path
) -> None:
    champion, candidate = two_versions(trained_model.stored, tmp_path, database_url, "shadowed")
    name = champion.name
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, token = rs.create_user(conn=conn, name="boss", role=rs.Role.ADMIN)
    admin = {"Authorization": f"Bearer {token}"}
    service = start_service(LOOP_MODEL_NAME=name, LOOP_MODEL_TAG="champion",
                            LOOP_WORKERS="2")  # fmt: skip
    images = digits.load().images[:12]
    bodies = [{"samples": [image.tolist()]} for image in images]
    before = [without_ids(httpx.post(f"{service.url}/predict", json=b, timeout=30).json()) for b in bodies]
    bytes_before = every_face(service.url, name, images[:6])

    started = httpx.post(f"{service.url}/admin/shadow", json={"version": candidate.version}, headers=admin)
    assert started.status_code == 201, started.text
    # Every worker follows the announcement (at once) and mirrors what it answers from then on:
    # probe until each worker has mirrored one.
    probes: dict[str, list[str]] = {}

    def every_worker_mirrors() -> bool:
        probe = httpx.post(f"{service.url}/predict", json=bodies[0], timeout=30)
        probes.setdefault(probe.headers["x-loop-worker"], []).append(probe.json()["predictions"][0]["id"])
        return len(probes) == 2 and all(shadows_stored(seen) > 0 for seen in probes.values())

    def shadows_stored(ids: list[str]) -> int:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM shadow_predictions WHERE prediction_id = ANY(%s::uuid[]) AND model_version = %s",
                (ids, candidate.version),
            ).fetchone()
        return int(row[0]) if row else 0

    wait_for(every_worker_mirrors, "both workers to mirror what they answer", on_timeout=service.logs)
    answered = [httpx.post(f"{service.url}/predict", json=b, timeout=30).json() for b in bodies]
    assert [without_ids(a) for a in answered] == before  # the shadow changes no answer
    assert every_face(service.url, name, images[:6]) == bytes_before  # not a byte of one, ids aside
    assert {p["model_version"] for a in answered for p in a["predictions"]} == {champion.version}
    # The other faces are mirrored too: .npy and the Open Inference Protocol.
    npy = httpx.post(f"{service.url}/predict/npy", content=npy_bytes(images[:2].astype(np.float32)), timeout=30)
    input_name = httpx.get(f"{service.url}/v2/models/{name}", timeout=10).json()["inputs"][0]["name"]
    tensor = {"name": input_name, "shape": [1, 8, 8], "datatype": "FP32", "data": images[0].ravel().tolist()}
    v2 = httpx.post(f"{service.url}/v2/models/{name}/infer", json={"inputs": [tensor]}, timeout=30)
    assert npy.status_code == 200 and v2.status_code == 200, (npy.text, v2.text)
    ids = [p["id"] for a in [*answered, npy.json()] for p in a["predictions"]]
    ids += v2.json()["parameters"]["prediction_ids"].split(",")  # a parameter is a scalar: comma-separated
    wait_for(lambda: shadows_stored(ids) == len(ids), "every shadow prediction to be ingested")
    stored = httpx.get(f"{service.url}/predictions/{ids[0]}", timeout=10).json()
    assert stored["model_version"] == champion.version
    assert [s["model_version"] for s in stored["shadows"]] == [candidate.version]
    assert stored["shadows"][0]["scores"] != stored["scores"]  # the candidate's own answer, not the champion's

    stopped = httpx.post(f"{service.url}/admin/shadow/stop", json={"reason": "seen enough"}, headers=admin)
    assert stopped.status_code == 200, stopped.text
    figures = httpx.get(f"{service.url}/admin/shadow", headers=admin).json()["evidence"]
    assert figures["shadowed"] >= len(ids) and figures["judged"] == 0  # the probes were shadowed too
