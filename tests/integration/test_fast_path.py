"""`POST /predict` answered in front of BentoML's stack (service.fast_path) answers exactly what
BentoML's API path answers, and is the path the requests take."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from models import digits, store
from models.npy import npy_bytes
from models.pipeline import BuildResult
from tests.graphs import import_shapes_model, random_png
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

DIGIT = digits.load().images[0].tolist()
JSON = {"content-type": "application/json"}

# (name, body bytes, extra headers, query string): what clients send, good and bad.
JSON_REQUESTS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("one digit", json.dumps({"samples": [DIGIT]}).encode(), {}, ""),
    ("two digits, tags", json.dumps({"samples": [DIGIT, DIGIT], "tags": {"app": "t"}}).encode(), {}, ""),
    ("a request id", json.dumps({"samples": [DIGIT]}).encode(), {"x-request-id": "req-1"}, ""),
    ("charset", json.dumps({"samples": [DIGIT]}).encode(), {"content-type": "application/json; charset=utf-8"}, ""),
    ("wrong shape", b'{"samples": [[1, 2]]}', {}, ""),
    ("no samples", b'{"samples": []}', {}, ""),
    ("unknown member", json.dumps({"samples": [DIGIT], "x": 1}).encode(), {}, ""),
    ("null model", json.dumps({"samples": [DIGIT], "model": None}).encode(), {}, ""),
    ("unknown model", json.dumps({"samples": [DIGIT], "model": "nope"}).encode(), {}, ""),
    ("not JSON", b"{samples", {}, ""),
    ("empty body", b"", {}, ""),
    ("NaN", b'{"samples": [[[NaN]]]}', {}, ""),
    ("a query string", json.dumps({"samples": [DIGIT]}).encode(), {}, "x=1"),
    ("text/plain", json.dumps({"samples": [DIGIT]}).encode(), {"content-type": "text/plain"}, ""),
]
DIGITS = digits.load().images[:3].astype(np.float32)
OCTETS = {"content-type": "application/octet-stream"}
NPY_REQUESTS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("three digits", npy_bytes(DIGITS), OCTETS, ""),
    ("one digit, no batch axis", npy_bytes(DIGITS[0]), OCTETS, ""),
    ("no media type", npy_bytes(DIGITS), {"content-type": ""}, ""),
    ("a request id", npy_bytes(DIGITS), {**OCTETS, "x-request-id": "npy-1"}, ""),
    ("the model named", npy_bytes(DIGITS), OCTETS, "model=digits-cnn"),
    ("an unknown model", npy_bytes(DIGITS), OCTETS, "model=nope"),
    ("a model name it cannot be", npy_bytes(DIGITS), OCTETS, "model=%00x"),
    ("another query", npy_bytes(DIGITS), OCTETS, "x=1"),
    ("the model twice", npy_bytes(DIGITS), OCTETS, "model=digits-cnn&model=digits-cnn"),
    ("wrong shape", npy_bytes(DIGITS[:, :4]), OCTETS, ""),
    ("integers", npy_bytes(DIGITS.astype(np.int64)), OCTETS, ""),
    ("not .npy", b"\x93NUMPY garbage", OCTETS, ""),
    ("empty body", b"", OCTETS, ""),
    ("NaN", npy_bytes(np.full((1, 8, 8), np.nan, np.float32)), OCTETS, ""),
    ("as JSON", npy_bytes(DIGITS), JSON, ""),
]
INPUT = digits.digits_spec().onnx_input


def v2_json(**fields: Any) -> bytes:
    tensor = {"name": INPUT, "shape": [1, 8, 8], "datatype": "FP32", "data": DIGITS[0].ravel().tolist()}
    return json.dumps({"inputs": [tensor], **fields}).encode()


def v2_binary(outputs: list[dict[str, Any]] | None = None) -> tuple[bytes, dict[str, str]]:
    data = DIGITS[:2].astype("<f4").tobytes()
    tensor = {"name": INPUT, "shape": [2, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor], **({"outputs": outputs} if outputs else {})}).encode()
    return header + data, {**OCTETS, "inference-header-content-length": str(len(header))}


BINARY, BINARY_HEADERS = v2_binary()
BINARY_OUT, BINARY_OUT_HEADERS = v2_binary([{"name": "probabilities", "parameters": {"binary_data": True}}])
V2_REQUESTS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("v2 JSON", v2_json(), {}, ""),
    ("v2 JSON, an id", v2_json(id="v2-1"), {}, ""),
    ("v2 JSON, a request id", v2_json(), {"x-request-id": "v2-2"}, ""),
    ("v2 binary in", BINARY, BINARY_HEADERS, ""),
    ("v2 binary in and out", BINARY_OUT, BINARY_OUT_HEADERS, ""),
    ("v2 binary, header too long", BINARY, {**BINARY_HEADERS, "inference-header-content-length": "99999"}, ""),
    ("v2 another input", v2_json().replace(INPUT.encode(), b"other"), {}, ""),
    ("v2 not JSON", b"{inputs", {}, ""),
    ("v2 no inputs", b'{"inputs": []}', {}, ""),
    ("v2 a query string", v2_json(), {}, "x=1"),
]
IMAGE_MODEL = "team-shapes-fast"
BOUNDARY = "fAsTpAtH"


def form(fields: dict[str, str], files: list[bytes], *, end: bool = True) -> bytes:
    """A multipart/form-data body: the fields, then one file part per image."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]  # fmt: skip
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="i{i}.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + f
        + b"\r\n"
        for i, f in enumerate(files)
    ]
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
UPLOADS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("an image", form({"model": IMAGE_MODEL}, [random_png(1)]), MULTIPART, ""),
    (
        "two images, tags",
        form({"model": IMAGE_MODEL, "tags": '{"app": "t"}'}, [random_png(2), random_png(3, (9, 30))]),
        MULTIPART,
        "",
    ),
    (
        "an image, a request id",
        form({"model": IMAGE_MODEL}, [random_png(4)]),
        {**MULTIPART, "x-request-id": "up-1"},
        "",
    ),
    ("the default model takes numbers", form({}, [random_png(5)]), MULTIPART, ""),
    ("not an image", form({"model": IMAGE_MODEL}, [b"GIF89a nothing"]), MULTIPART, ""),
    ("no files", form({"model": IMAGE_MODEL}, []), MULTIPART, ""),
    ("tags not JSON", form({"model": IMAGE_MODEL, "tags": "{"}, [random_png(6)]), MULTIPART, ""),
    ("an unknown model", form({"model": "nope"}, [random_png(7)]), MULTIPART, ""),
    ("an unfinished form", form({"model": IMAGE_MODEL}, [random_png(8)], end=False), MULTIPART, ""),
    ("no boundary", form({"model": IMAGE_MODEL}, [random_png(9)]), {"content-type": "multipart/form-data"}, ""),
]

REQUESTS = (
    [("/predict", *r) for r in JSON_REQUESTS]
    + [("/predict/npy", *r) for r in NPY_REQUESTS]
    + [("/v2/models/digits-cnn/infer", *r) for r in V2_REQUESTS]
    + [("/v2/models/nope/infer", "v2 unknown model", v2_json(), {}, "")]
    + [("/v2/models/digits-cnn/versions/nope/infer", "v2 unknown version", v2_json(), {}, "")]
    + [("/predict/files", *r) for r in UPLOADS]
    + [("/predict", *r) for r in UPLOADS if r[0] in ("an image", "no files")]  # uploads come to /predict too
)


def _comparable(response: httpx.Response) -> tuple[int, str, Any]:
    """Status, media type and body, with what differs by request (ids, the worker) left out."""
    text = re.sub(r'"(id|request_id)":\s*"[^"]+"', r'"\1": "-"', response.text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "-", text)  # v2's prediction ids
    try:
        body: Any = json.loads(text)
    except json.JSONDecodeError:
        body = text
    return response.status_code, response.headers.get("content-type", ""), body


def _send(service: RunningService, path: str, body: bytes, headers: dict[str, str], query: str) -> httpx.Response:
    url = f"{service.url}{path}" + (f"?{query}" if query else "")
    sent = {k: v for k, v in {**JSON, **headers}.items() if v}  # an empty value: no such header
    return httpx.post(url, content=body, headers=sent, timeout=30)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    return import_shapes_model(tmp_path_factory.mktemp("fast"), IMAGE_MODEL)


def test_the_fast_path_answers_what_bentomls_path_answers(
    start_service: Callable[..., RunningService], trained_model: BuildResult, image_model: store.StoredModel
) -> None:
    models = f"{trained_model.stored.tag},{image_model.name}"  # digits the default, an image model beside it
    fast = start_service(via_cli=False, LOOP_MODELS=models)
    answers = [_send(fast, path, body, headers, query) for path, _, body, headers, query in REQUESTS]
    # Read before the second service starts: services of one BentoML home share its metrics folder.
    metrics = _metrics(fast)
    through_bentoml = start_service(via_cli=False, LOOP_MODELS=models, LOOP_FAST_PATH="false")
    for (path, name, body, headers, query), a in zip(REQUESTS, answers, strict=True):
        b = _send(through_bentoml, path, body, headers, query)
        assert _comparable(a) == _comparable(b), name
        if a.status_code == 200:
            assert {"x-request-id", "x-loop-worker"} <= set(a.headers), name
            assert _headers(a) == _headers(b), name  # the same headers, with the same values
            assert a.headers["x-request-id"] == headers.get("x-request-id", a.headers["x-request-id"])

    # The good JSON requests took the fast path; BentoML's own request counter saw only the others
    # (a query string, another media type), and sees every one when the fast path is off.
    pattern = r'^loop_fast_path_request_seconds_count\{route="([^"]+)",status="(\d+)"\} (\S+)$'
    fast_answers = {(route, status): float(n) for route, status, n in re.findall(pattern, metrics, re.M)}
    assert fast_answers == {
        # JSON: wrong shape and NaN; unknown model. Uploads: an image, and one with no files
        ("/predict", "200"): 4 + 1, ("/predict", "400"): 2 + 1, ("/predict", "404"): 1,
        # .npy: no media type, the model named and integers too; wrong shape, not .npy, empty, NaN; unknown model
        ("/predict/npy", "200"): 6, ("/predict/npy", "400"): 4, ("/predict/npy", "404"): 1,
        # v2, by the route's template: JSON (three) and binary (two); a header too long, another input,
        # not JSON, no inputs; an unknown model and an unknown version (a query string was handed over)
        ("/v2/models/{name}/infer", "200"): 5, ("/v2/models/{name}/infer", "400"): 4,
        ("/v2/models/{name}/infer", "404"): 1, ("/v2/models/{name}/versions/{version}/infer", "404"): 1,
        # uploads: three good; not an image, no files, bad tags, an unfinished form, no boundary; an unknown
        # model; files for the tensor model
        ("/predict/files", "200"): 3, ("/predict/files", "400"): 5, ("/predict/files", "404"): 1,
        ("/predict/files", "415"): 1,
    }, fast_answers  # fmt: skip
    answered = sum(a.status_code == 200 for (path, *_), a in zip(REQUESTS, answers, strict=True) if path == "/predict")
    assert _bentoml_predictions(metrics) == answered - 5
    assert _bentoml_predictions(_metrics(through_bentoml)) == answered


def _headers(response: httpx.Response) -> dict[str, str]:
    """The headers but those that differ by answer (its length, time, request id and worker)."""
    varying = {"content-length", "date", "x-request-id", "x-loop-worker"}
    return {k: v for k, v in response.headers.items() if k not in varying}


def _metrics(service: RunningService) -> str:
    return httpx.get(f"{service.url}/metrics", timeout=10).text


def _bentoml_predictions(metrics: str) -> float:
    """BentoML's count of `POST /predict` answered 200."""
    pattern = r'^bentoml_service_request_total\{endpoint="/predict",http_response_code="200",[^}]*\} (\S+)$'
    return sum(float(n) for n in re.findall(pattern, metrics, re.M))
