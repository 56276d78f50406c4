"""Several models in one `bentoml serve`: each answers with its own name and version, batches on its own."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models import digits
from models.importer import import_model
from models.pipeline import BuildResult
from models.spec import ModelSpec
from tests.graphs import linear_classifier
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration


def batched(metrics_text: str, what: str) -> dict[str, float]:
    """Per model, from the loop_batch_size histogram: model calls (`count`) or samples in them (`sum`)."""
    found = re.finditer(rf'^loop_batch_size_{what}\{{[^}}]*model_name="([^"]+)"[^}}]*\}} (\S+)$', metrics_text, re.M)
    return {m.group(1): float(m.group(2)) for m in found}


def test_two_models_answer_and_batch_each_on_their_own(
    start_service: Callable[..., RunningService], trained_model: BuildResult, tmp_path: Path
) -> None:
    spec = ModelSpec.model_validate(
        {"input": {"kind": "tensor", "shape": [4], "min_value": 0, "max_value": 1}, "classes": ["no", "yes"]}
    )
    path = linear_classifier(tmp_path / "t.onnx", input_name="input", input_dims=["n", 4], classes=2, features=4)
    other = import_model("team-yes-no", path, spec)
    first = trained_model.stored
    service = start_service(via_cli=False, LOOP_MODELS=f"{first.name}:{first.version},{other.name}")
    with httpx.Client(base_url=service.url, timeout=30) as http:
        listed = http.get("/models").json()
        assert listed["default"] == first.name
        assert [(m["name"], m["version"]) for m in listed["models"]] == [
            (first.name, first.version), (other.name, other.version)
        ]  # fmt: skip
        digit = digits.load().images[0].tolist()
        default = http.post("/predict", json={"samples": [digit]}).json()["predictions"][0]
        assert (default["model_name"], default["model_version"]) == (first.name, first.version)
        answer = http.post("/predict", json={"samples": [[0.1, 0.2, 0.3, 0.4]], "model": other.name})
        assert answer.status_code == 200, answer.text
        (yes_no,) = answer.json()["predictions"]
        assert (yes_no["model_name"], yes_no["model_version"]) == (other.name, other.version)
        assert set(yes_no["scores"]) == {"no", "yes"}
        # Each model checks its own input.
        wrong = http.post("/predict", json={"samples": [digit], "model": other.name})
        assert wrong.status_code == 400 and "shape [4]" in wrong.json()["detail"]
        unknown = http.post("/predict", json={"samples": [digit], "model": "nobody"})
        assert unknown.status_code == 404 and other.name in unknown.json()["detail"]
        stored = http.get(f"/predictions/{yes_no['id']}")
        assert stored.status_code == 200 and stored.json()["model_name"] == other.name

    text = httpx.get(f"{service.url}/metrics").text
    calls, samples = batched(text, "count"), batched(text, "sum")
    barrier = threading.Barrier(16)

    def client(i: int) -> str:
        body = {"samples": [digit]} if i % 2 else {"samples": [[0.5] * 4], "model": other.name}
        with httpx.Client(base_url=service.url, timeout=30) as http:
            barrier.wait()
            for _ in range(5):
                response = http.post("/predict", json=body)
                assert response.status_code == 200, response.text
            return str(response.json()["predictions"][0]["model_name"])

    with ThreadPoolExecutor(16) as pool:
        names = list(pool.map(client, range(16)))
    assert sorted(set(names)) == sorted({first.name, other.name})
    text = httpx.get(f"{service.url}/metrics").text
    # Each model's own batcher ran exactly its own 40 samples (8 clients x 5 requests), in calls of its own.
    for name in (first.name, other.name):
        assert batched(text, "sum")[name] - samples.get(name, 0) == 40
        assert batched(text, "count")[name] - calls.get(name, 0) >= 1
