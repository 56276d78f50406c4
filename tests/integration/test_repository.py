"""The model repository extension against `loop serve` with two workers: a stored model loaded
without a restart answers on every worker within seconds, and unloading it while another model is
under load drops none of that model's requests."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from feedback import review as rs
from models import digits, store
from models.pipeline import BuildResult
from tests.graphs import import_shapes_model, random_png
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    return import_shapes_model(tmp_path_factory.mktemp("repo"), "team-shapes-repo")


def answered_by(service: RunningService, body: Mapping[str, object]) -> tuple[int, str]:
    response = httpx.post(f"{service.url}/predict", json=body, timeout=30)
    return response.status_code, response.headers.get("x-loop-worker", "")


def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_model_is_loaded_and_unloaded_without_a_restart(
    start_service: Callable[..., RunningService], trained_model: BuildResult, image_model: store.StoredModel,
    database_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, token = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
        _, reviewer = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
    admin = {"Authorization": f"Bearer {token}"}
    service = start_service(LOOP_MODELS=trained_model.stored.tag, LOOP_WORKERS="2")
    repo = f"{service.url}/v2/repository"
    image = {"model": image_model.name, "samples": [base64.b64encode(random_png(1)).decode()]}

    assert httpx.post(f"{repo}/index").status_code == 401
    assert httpx.post(f"{repo}/index", headers={"Authorization": f"Bearer {reviewer}"}).status_code == 403
    index = {(e["name"], e["version"]): e for e in httpx.post(f"{repo}/index", headers=admin).json()}
    assert index[(trained_model.stored.name, trained_model.stored.version)]["state"] == "READY"
    assert index[(image_model.name, image_model.version)]["reason"] == "not loaded"
    assert answered_by(service, image)[0] == 404

    refusals = [
        (f"{repo}/models/nobody/load", {}, 404, "no model 'nobody'"),
        (f"{repo}/models/{image_model.name}/load", {"parameters": {"version": "9"}}, 404, "has no version '9'"),
        (f"{repo}/models/{image_model.name}/load", {"parameters": {"config": "{}"}}, 422, "config"),
        (f"{repo}/models/{trained_model.stored.name}/unload", None, 409, "started with (LOOP_MODELS)"),
        (f"{repo}/models/{image_model.name}/unload", None, 404, "is not loaded"),
    ]
    for url, body, status, fragment in refusals:
        refused = httpx.post(url, json=body, headers=admin, timeout=30)
        assert refused.status_code == status and fragment in refused.json()["detail"], (url, refused.text)

    started = time.monotonic()
    loaded = httpx.post(f"{repo}/models/{image_model.name}/load", json={"parameters": {"version": "1"}},
                        headers=admin, timeout=150)  # fmt: skip
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"name": image_model.name, "version": image_model.version, "state": "READY"}
    workers: set[str] = set()

    def both_workers_answer() -> bool:
        status, worker = answered_by(service, image)
        if status == 200:
            workers.add(worker)
        return len(workers) == 2

    until(both_workers_answer, "both workers to answer for the loaded model")
    assert time.monotonic() - started < 30  # within seconds, load included
    assert httpx.post(f"{repo}/models/{image_model.name}/load", json={}, headers=admin).status_code == 200  # again
    ready = httpx.post(f"{repo}/index", json={"ready": True}, headers=admin).json()
    assert {(e["name"], e["version"]) for e in ready} == {
        (trained_model.stored.name, trained_model.stored.version), (image_model.name, image_model.version)}  # fmt: skip

    # Unloading it while the digits model is under load drops none of the digits' requests.
    digit = {"samples": [digits.load().images[0].tolist()]}
    statuses: list[int] = []
    stop = threading.Event()

    def load_digits() -> None:
        while not stop.is_set():
            statuses.append(httpx.post(f"{service.url}/predict", json=digit, timeout=30).status_code)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(load_digits)
        time.sleep(1.0)
        unloaded = httpx.post(f"{repo}/models/{image_model.name}/unload", headers=admin, timeout=60)
        until(lambda: all(answered_by(service, image)[0] == 404 for _ in range(6)), "both workers to unload it")
        time.sleep(1.0)
        stop.set()
    assert unloaded.status_code == 200, unloaded.text
    assert len(statuses) > 100 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
