"""NVIDIA's perf_analyzer, unmodified, against `loop serve` over HTTP: a tensor model and an image
model, concurrency 1 to 16. The requests it sends are the requests the statistics extension counts,
and the statistics' durations add up to the request time they report."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import perf_analyzer
from models import store
from models.pipeline import BuildResult
from tests.graphs import import_shapes_model, random_png
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

REQUESTS = 120  # a run's requests, at each concurrency
COUNTED = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    return import_shapes_model(tmp_path_factory.mktemp("pa"), "team-shapes-pa")


@pytest.fixture(scope="module")
def command() -> list[str]:
    try:
        return perf_analyzer.command()
    except perf_analyzer.NotInstalled as exc:
        pytest.fail(str(exc))  # `make test` installs it first


@pytest.fixture
def service(
    start_service: Callable[..., RunningService], trained_model: BuildResult, image_model: store.StoredModel
) -> Iterator[RunningService]:
    yield start_service(LOOP_MODELS=f"{trained_model.stored.tag},{image_model.name}")


def statistics(service: RunningService, model: str) -> dict[str, Any]:
    response = httpx.get(f"{service.url}/v2/models/{model}/stats", timeout=10)
    assert response.status_code == 200, response.text
    (stats,) = response.json()["model_stats"]  # the one version served
    return dict(stats)


def profile(command: list[str], service: RunningService, model: str, concurrency: int, *extra: str) -> str:
    run = subprocess.run(
        [*command, "-m", model, "-u", service.url.removeprefix("http://"), "-i", "http",
         "--concurrency-range", str(concurrency), "--request-count", str(REQUESTS), *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_perf_analyzer_measures_both_models_and_its_requests_are_ours(
    command: list[str], service: RunningService, trained_model: BuildResult, image_model: store.StoredModel,
    tmp_path: Path, concurrency: int,
) -> None:  # fmt: skip
    # perf_analyzer's input data: a PNG a request, as the protocol's binary BYTES (length, then bytes).
    pngs = [base64.b64encode(struct.pack("<I", len(p)) + p).decode() for p in map(random_png, range(4))]
    images = tmp_path / "images.json"
    images.write_text(json.dumps({"data": [{"image": {"b64": p}} for p in pngs]}))
    for model, data in ((trained_model.stored.name, "zero"), (image_model.name, str(images))):
        before = statistics(service, model)
        output = profile(command, service, model, concurrency, "--input-data", data)
        after = statistics(service, model)
        sent = int(re.search(r"Client:\s+Request count: (\d+)", output).group(1))  # type: ignore[union-attr]
        assert sent == REQUESTS, output
        counted = {k: after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"] for k in COUNTED}
        assert counted == {k: 0 if k == "fail" else sent for k in COUNTED}, output
        assert after["inference_count"] - before["inference_count"] == sent  # one sample a request
        executions = after["execution_count"] - before["execution_count"]
        assert 1 <= executions <= sent and (concurrency > 1 or executions == sent)
        assert re.search(r"Server:\s+Inference count: \d+", output), output  # perf_analyzer read our statistics

        spent = {k: after["inference_stats"][k]["ns"] - before["inference_stats"][k]["ns"] for k in COUNTED}
        parts = spent["queue"] + spent["compute_input"] + spent["compute_infer"] + spent["compute_output"]
        assert parts == pytest.approx(spent["success"], rel=0.10), spent


def test_two_workers_answer_the_statistics_of_both(
    command: list[str], start_service: Callable[..., RunningService], trained_model: BuildResult
) -> None:
    """Each worker shares its counts: whichever answers the statistics counts every request."""
    service = start_service(LOOP_MODELS=trained_model.stored.tag, LOOP_WORKERS="2")
    name = trained_model.stored.name
    before = statistics(service, name)["inference_stats"]["success"]["count"]
    output = profile(command, service, name, 16, "--input-data", "zero")
    sent = int(re.search(r"Client:\s+Request count: (\d+)", output).group(1))  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while (counted := statistics(service, name)["inference_stats"]["success"]["count"] - before) < sent:
        assert time.monotonic() < deadline, f"counted {counted} of {sent}"
        time.sleep(0.1)
    assert counted == sent
    workers = {httpx.post(f"{service.url}/predict", json={"samples": [[[0] * 8] * 8]}).headers["x-loop-worker"]
               for _ in range(40)}  # fmt: skip
    assert len(workers) == 2, workers  # both answered requests
