"""The Open Inference Protocol, spoken by an unmodified `tritonclient[http]`, against `bentoml serve`."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from feedback.keys import Keys
from models import digits, store
from models.pipeline import BuildResult
from tests.conftest import REDIS
from tests.graphs import import_shapes_model, random_png
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    return import_shapes_model(tmp_path_factory.mktemp("v2"), "team-shapes-v2")


@pytest.fixture
def served(
    start_service: Callable[..., RunningService], trained_model: BuildResult, image_model: store.StoredModel
) -> Iterator[tuple[RunningService, triton.InferenceServerClient]]:
    service = start_service(via_cli=False, LOOP_MODELS=f"{trained_model.stored.tag},{image_model.name}")
    client = triton.InferenceServerClient(service.url.removeprefix("http://"))
    try:
        yield service, client
    finally:
        client.close()


def predict(service: RunningService, body: dict[str, Any]) -> list[Any]:
    response = httpx.post(f"{service.url}/predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json()["predictions"])


def stream_length(keys: Keys) -> int:
    with redis.Redis.from_url(REDIS) as r:
        return int(r.xlen(keys.stream))


def test_a_triton_client_works_unchanged(
    served: tuple[RunningService, triton.InferenceServerClient], trained_model: BuildResult,
    image_model: store.StoredModel,
) -> None:  # fmt: skip
    service, client = served
    name = trained_model.stored.name
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, trained_model.stored.version)
    assert not client.is_model_ready(name, "not-this-version")
    metadata = client.get_model_metadata(name)
    assert metadata["versions"] == [trained_model.stored.version] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "label"]

    images = digits.load().images[:3].astype(np.float32)
    expected = predict(service, {"samples": images.tolist()})
    ids = []
    for binary in (False, True):
        tensor = triton.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary),
                   triton.InferRequestedOutput("label", binary_data=binary)]  # fmt: skip
        result = client.infer(name, [tensor], outputs=outputs, request_id=f"r-{binary}")
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert labels == [p["label"] for p in expected]
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (3, 10)
        for row, want in zip(probabilities, expected, strict=True):
            assert row.tolist() == pytest.approx([want["scores"][c] for c in digits.CLASS_NAMES], abs=1e-6)
        response = result.get_response()
        assert response["model_name"] == name and response["id"] == f"r-{binary}"
        ids += response["parameters"]["prediction_ids"].split(",")
    # Integer types are converted; no outputs named means binary outputs of both.
    as_int = triton.InferInput("input", [1, 8, 8], "INT64")
    as_int.set_data_from_numpy(images[:1].astype(np.int64))
    assert client.infer(name, [as_int]).as_numpy("label").tolist() == [expected[0]["label"].encode()]

    # An image model: BYTES elements holding encoded images, binary or base64 in JSON.
    shapes = [random_png(1), random_png(2)]
    want = predict(service, {"model": image_model.name, "samples": [base64.b64encode(b).decode() for b in shapes]})
    for binary in (True, False):
        elements = shapes if binary else [base64.b64encode(b) for b in shapes]
        tensor = triton.InferInput("image", [2], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
        result = client.infer(image_model.name, [tensor])
        assert [v.decode() for v in result.as_numpy("label")] == [p["label"] for p in want]
        ids += result.get_response()["parameters"]["prediction_ids"].split(",")
    assert client.get_model_metadata(image_model.name)["inputs"][0]["datatype"] == "BYTES"

    # Every id answered is stored like any prediction (from the stream or Postgres).
    for prediction_id in ids:
        stored = httpx.get(f"{service.url}/predictions/{prediction_id}")
        assert stored.status_code == 200, stored.text
    raw = httpx.get(f"{service.url}/predictions/{ids[-1]}/input")
    assert raw.content == shapes[1]  # the image as sent


def test_the_configuration_and_statistics_extensions_speak_to_a_triton_client(
    served: tuple[RunningService, triton.InferenceServerClient], trained_model: BuildResult,
    image_model: store.StoredModel,
) -> None:  # fmt: skip
    service, client = served
    name = trained_model.stored.name
    assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(
        client.get_server_metadata()["extensions"]
    )
    config = client.get_model_config(name)
    assert (config["max_batch_size"], config["platform"], config["backend"]) == (64, "onnxruntime_onnx", "onnxruntime")
    assert config["input"] == [{"name": "input", "format": "FORMAT_NONE", "optional": False,
                                "data_type": "TYPE_FP32", "dims": [8, 8]}]  # fmt: skip
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("probabilities", "TYPE_FP32", [10]), ("label", "TYPE_STRING", [1])]  # fmt: skip
    assert "dynamic_batching" in config and config["instance_group"][0]["kind"] == "KIND_CPU"
    image_config = client.get_model_config(image_model.name)["input"][0]
    assert (image_config["data_type"], image_config["dims"], image_config["reshape"]) == (
        "TYPE_STRING",
        [1],
        {"shape": []},
    )
    assert client.get_model_metadata(image_model.name)["inputs"][0]["shape"] == [-1, 1]
    # An image batch as [N, 1], as a Triton client reads that metadata, or as [N].
    tensor = triton.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[random_png(3)], [random_png(4)]], dtype=object))
    assert len(client.infer(image_model.name, [tensor]).as_numpy("label")) == 2

    # Versions by number, as Triton numbers them: this one is its model's newest stored version.
    number = str(len(store.list_models(name)))
    images = digits.load().images[:5].astype(np.float32)
    before = client.get_inference_statistics(name)["model_stats"][0]
    for k in range(3):  # 1 + 2 + 2 samples in three requests
        tensor = triton.InferInput("input", [2 if k else 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(images[:2] if k else images[:1])
        client.infer(name, [tensor], model_version=number if k == 2 else "")
    after = client.get_inference_statistics(name, model_version=number)["model_stats"][0]
    assert (after["name"], after["version"]) == (name, number)
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["execution_count"] - before["execution_count"] == 3  # one at a time: a call each
    stats = after["inference_stats"]
    parts = sum(stats[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts == pytest.approx(stats["success"]["ns"], rel=0.10)
    everything = httpx.get(f"{service.url}/v2/models/stats").json()["model_stats"]
    assert {s["name"] for s in everything} == {name, image_model.name}
    assert httpx.get(f"{service.url}/v2/models/{name}/versions/{int(number) + 1}/stats").status_code == 404


def _binary_request(header: Any, data: bytes, declared: int | None = None) -> httpx.Request:
    encoded = json.dumps(header).encode()
    return httpx.Request("POST", "/", content=encoded + data,
                         headers={"Inference-Header-Content-Length": str(declared or len(encoded))})  # fmt: skip


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
        ("/v2/models/nobody/infer", {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}]},
         404, "unknown model"),
        ("/v2/models/{digits}/infer", {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "BYTES",
                                                   "data": ["x"] * 64}]}, 400, "takes numbers"),
        ("/v2/models/{digits}/infer", {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                                   "data": [1] * 63}]}, 400, "holds 64 elements, the data has 63"),
        ("/v2/models/{digits}/infer", {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                                   "data": [1] * 64}], "outputs": [{"name": "logits"}]},
         400, "unknown output 'logits'"),
        ("/v2/models/{digits}/infer", {"inputs": [{"name": "pixels", "shape": [1, 8, 8], "datatype": "FP32",
                                                   "data": [1] * 64}]}, 400, "one input named 'input'"),
        ("/v2/models/{digits}/infer", {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                                   "data": [99] * 64}]}, 400, "outside the range"),
        ("/v2/models/{digits}/versions/nope/infer", {"inputs": [{"name": "input", "shape": [1, 8, 8],
                                                                 "datatype": "FP32", "data": [1] * 64}]},
         404, "version 'nope' is not the one loaded"),
        ("/v2/models/{digits}/infer", "not json", 400, "not JSON"),

]  # fmt: skip


def test_bad_requests_get_the_protocols_error_and_store_nothing(
    served: tuple[RunningService, triton.InferenceServerClient], trained_model: BuildResult, keys: Keys
) -> None:
    service, _ = served
    before = stream_length(keys)
    for path, body, status, fragment in BAD_REQUESTS:
        content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        response = httpx.post(service.url + path.format(digits=trained_model.stored.name), content=content)
        assert response.status_code == status, (path, response.text)
        assert fragment in response.json()["error"], (path, response.text)
    assert stream_length(keys) == before


def test_a_binary_size_that_does_not_match_the_body_is_refused(
    served: tuple[RunningService, triton.InferenceServerClient], trained_model: BuildResult, keys: Keys
) -> None:
    service, client = served
    before = stream_length(keys)
    url = f"{service.url}/v2/models/{trained_model.stored.name}/infer"
    data = np.ones((1, 8, 8), "<f4").tobytes()
    header: Any = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                          "parameters": {"binary_data_size": len(data)}}]}  # fmt: skip
    for extra, fragment in ((b"xx", "add up to 256"), (b"", None)):
        request = _binary_request(header, data + extra)
        response = httpx.post(url, content=request.content, headers=dict(request.headers))
        if fragment is None:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 400 and fragment in response.json()["error"]
    short = {"inputs": [{**header["inputs"][0], "parameters": {"binary_data_size": 300}}]}
    request = _binary_request(short, data)
    response = httpx.post(url, content=request.content, headers=dict(request.headers))
    assert response.status_code == 400 and "binary_data_size 300" in response.json()["error"]
    assert stream_length(keys) == before + 1  # only the good one
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nobody")
