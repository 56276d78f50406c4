"""The service in-process (BentoML's ASGI app) against the session's trained model."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any, cast

import jsonschema_rs
import numpy as np
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from feedback.keys import Keys
from feedback.predictions.ingest import IngestConfig, IngestWorker
from models import digits, store
from models.importer import import_model
from models.pipeline import BuildResult
from models.spec import ModelSpec
from tests.conftest import REDIS, fresh_database, redis_namespace
from tests.graphs import linear_classifier

pytestmark = pytest.mark.api

MAX_SAMPLES = 16


def wait_ready(client: TestClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def data() -> digits.Digits:
    return digits.load()


@pytest.fixture(scope="module")
def module_database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def module_keys() -> Iterator[Keys]:
    with redis_namespace() as keys:
        yield keys


IMAGE_CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    """A team's image classifier (any weights), imported beside the digits model."""
    spec = ModelSpec.model_validate({
        "input": {"kind": "image", "width": 16, "height": 16, "mode": "RGB", "mean": [0.5], "std": [0.25],
                  "max_pixels": 100_000},
        "classes": list(IMAGE_CLASSES), "onnx_input": "image",
    })  # fmt: skip
    path = linear_classifier(tmp_path_factory.mktemp("onnx") / "shapes.onnx", input_dims=["batch", 3, 16, 16],
                             features=3 * 16 * 16)  # fmt: skip
    return import_model("team-shapes-api", path, spec)


@pytest.fixture(scope="module")
def client(
    model_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    module_database: str,
    module_keys: Keys,
    trained_model: BuildResult,
    image_model: store.StoredModel,
) -> Iterator[TestClient]:
    # BentoML registers its Prometheus metrics once per process, so one app serves the module.
    from service.app import Predictor

    database_url = module_database
    keys = module_keys
    with pytest.MonkeyPatch.context() as mp:
        env = {
            **model_env,
            "LOOP_DATABASE_URL": database_url,
            "LOOP_REDIS_URL": REDIS,
            "LOOP_REDIS_PREFIX": keys.prefix,
            "LOOP_VAR_DIR": str(tmp_path_factory.mktemp("var")),
            "LOOP_MAX_SAMPLES_PER_REQUEST": str(MAX_SAMPLES),
            # One review settles an item here (10% would otherwise, by id, ask for a second one).
            "LOOP_REVIEW_OVERLAP_SHARE": "0",
            # the digits model first (the default), the image model beside it
            "LOOP_MODELS": f"{trained_model.stored.tag},{image_model.name}",
        }
        for key, value in env.items():
            mp.setenv(key, value)
        with TestClient(cast(Any, Predictor).to_asgi()) as c:
            wait_ready(c)
            yield c


def post_raw(client: TestClient, body: bytes) -> Any:
    return client.post("/predict", content=body, headers={"content-type": "application/json"})


def test_single_sample(client: TestClient, data: digits.Digits, trained_model: BuildResult) -> None:
    response = client.post("/predict", json={"samples": [data.images[5].tolist()]})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["label"] == str(data.labels[5])
    assert uuid.UUID(prediction["id"]).version == 7
    assert set(prediction["scores"]) == set(digits.CLASS_NAMES)
    assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert prediction["confidence"] == pytest.approx(max(prediction["scores"].values()))
    assert prediction["scores"][prediction["label"]] == prediction["confidence"]
    assert prediction["model_name"] == trained_model.stored.name
    assert prediction["model_version"] == trained_model.stored.version


def test_many_samples_answer_in_order_with_increasing_ids(client: TestClient, data: digits.Digits) -> None:
    picks = list(range(100, 100 + MAX_SAMPLES))
    response = client.post("/predict", json={"samples": [data.images[i].tolist() for i in picks]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == MAX_SAMPLES
    labels = [int(p["label"]) for p in predictions]
    assert np.mean(np.array(labels) == data.labels[picks]) >= 0.9
    ids = [uuid.UUID(p["id"]) for p in predictions]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_integers_are_accepted(client: TestClient, data: digits.Digits) -> None:
    sample = data.images[0].astype(int).tolist()
    response = client.post("/predict", json={"samples": [sample]})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == str(data.labels[0])


def grid(value: Any) -> list[list[Any]]:
    return [[value] * 8 for _ in range(8)]


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("malformed JSON", b'{"samples": [[1, 2', "Invalid JSON"),
    ("not an object", b"[1, 2, 3]", "Input should be an object"),
    ("samples missing", b"{}", "Field required"),
    ("samples not a list", b'{"samples": "eight by eight"}', "valid array"),
    ("empty list", b'{"samples": []}', "samples: List should have at least 1 item"),
    ("too many samples", json.dumps({"samples": [grid(1)] * (MAX_SAMPLES + 1)}).encode(), "too many samples"),
    ("wrong shape", json.dumps({"samples": [[[1.0] * 8] * 7]}).encode(), "must have shape [8, 8]"),
    ("ragged rows", json.dumps({"samples": [[[1.0] * 8] * 7 + [[1.0] * 5]]}).encode(), "ragged"),
    ("a flat vector", json.dumps({"samples": [[1.0] * 64]}).encode(), "must have shape [8, 8]"),
    ("text values", json.dumps({"samples": [grid("7")]}).encode(), "only numbers"),
    ("booleans", json.dumps({"samples": [grid(True)]}).encode(), "only numbers"),
    ("nulls", json.dumps({"samples": [grid(None)]}).encode(), "only numbers"),
    ("NaN", json.dumps({"samples": [grid(float("nan"))]}).encode(), "non-finite"),
    ("Infinity", json.dumps({"samples": [grid(float("inf"))]}).encode(), "non-finite"),
    (
        "huge number",
        b'{"samples": [' + json.dumps(grid(1)).encode().replace(b"1", b"1e400", 1) + b"]}",
        "non-finite",
    ),
    ("above range", json.dumps({"samples": [grid(17)]}).encode(), "outside the range [0, 16]"),
    ("below range", json.dumps({"samples": [grid(-0.5)]}).encode(), "outside the range [0, 16]"),
]


@pytest.mark.parametrize(("case", "body", "fragment"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_gets_400_naming_the_problem(client: TestClient, case: str, body: bytes, fragment: str) -> None:
    response = post_raw(client, body)
    assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
    assert fragment in response.text, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 400 and response.json()["title"] == "Bad Request"


def test_bad_input_does_not_break_the_next_request(client: TestClient, data: digits.Digits) -> None:
    for _, body, _ in BAD_BODIES:
        post_raw(client, body)
    response = client.post("/predict", json={"samples": [data.images[1].tolist()]})
    assert response.status_code == 200


def test_models_route_tells_what_is_served(client: TestClient, trained_model: BuildResult) -> None:
    response = client.get("/models")
    assert response.status_code == 200
    listed = response.json()
    assert listed["default"] == trained_model.stored.name and listed["not_ready"] == {}
    body, image = listed["models"]
    assert image["input_kind"] == "image" and image["signature"]["input_shape"] == [3, 16, 16]
    assert client.get(f"/models/{trained_model.stored.name}").json() == body
    assert client.get("/models/not-served").status_code == 404
    assert body["input_kind"] == "tensor"
    assert body["name"] == trained_model.stored.name
    assert body["version"] == trained_model.stored.version
    assert body["provider"] in body["providers"]
    if body["provider"] == "CPUExecutionProvider":
        assert body["fallback_reason"]  # a CPU fallback from 'auto' is never silent
    assert body["signature"]["input_shape"] == [8, 8]
    assert body["signature"]["max_value"] == 16.0
    assert body["metrics"]["accuracy"] >= 0.95
    assert body["batching"]["max_samples_per_request"] == MAX_SAMPLES
    for served in (body, image):  # each checked against its stored reference when it was loaded
        reference = served["reference"]
        assert reference["provider"] == served["provider"] and reference["samples"] > 0
        assert 0 <= reference["max_abs_diff"] <= reference["tolerance"] == 1e-3


def documented_examples(node: Any, at: str = "#", *, names: bool = False) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every example an OpenAPI document gives, with the schema it is given for; `names`: `node`
    maps names to schemas (`properties`, `schemas`), so a property called 'examples' is no keyword."""
    if isinstance(node, list):
        for i, value in enumerate(node):
            yield from documented_examples(value, f"{at}/{i}")
        return
    if not isinstance(node, dict):
        return
    if not names:
        yield from examples_of(node, at)
    for key, value in node.items():
        if names or key not in ("example", "examples"):  # an example's value is data, not more document
            yield from documented_examples(value, f"{at}/{key}", names=not names and key in ("properties", "schemas"))


def examples_of(node: dict[str, Any], at: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """A media type's (or parameter's) `example` and named `examples`, of its schema; else a
    schema's own `examples` (and OpenAPI 3.0's `example`)."""
    if "schema" in node:
        named = node.get("examples")
        for name, example in named.items() if isinstance(named, dict) else ():
            yield f"{at}/examples/{name}", node["schema"], example["value"]
        if "example" in node:
            yield f"{at}/example", node["schema"], node["example"]
        return
    schema = {k: v for k, v in node.items() if k not in ("examples", "example")}
    listed = node.get("examples")
    for i, example in enumerate(listed if isinstance(listed, list) else []):
        yield f"{at}/examples/{i}", schema, example
    if "example" in node:
        yield f"{at}/example", schema, node["example"]


def conforms(spec: dict[str, Any], schema: dict[str, Any], value: Any) -> list[str]:
    """What is wrong with `value` under `schema`, whose references point into `spec`."""
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]})
    return [error.message for error in validator.iter_errors(value)]


def test_openapi_documents_the_routes_with_examples_that_hold(client: TestClient) -> None:
    spec = client.get("/docs.json").json()
    assert {"/predict", "/models", "/models/{name}"} <= set(spec["paths"])
    examples = list(documented_examples(spec))
    assert "#/components/schemas/PredictionPublic/properties/confidence/examples/0" in {at for at, _, _ in examples}
    wrong = {at: problems for at, schema, value in examples if (problems := conforms(spec, schema, value))}
    assert wrong == {}, "documented examples their own schema refuses"

    # The operations a client starts with carry examples: the request that /predict takes ...
    predict = spec["paths"]["/predict"]["post"]
    request = predict["requestBody"]["content"]["application/json"]["schema"]
    body = {name: p["examples"][0] for name, p in request["properties"].items() if p.get("examples")}
    assert set(body) >= set(request["required"])
    # ... and the answers it gives, field by field.
    answer = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["properties"]["predictions"]["items"] == {"$ref": "#/components/schemas/PredictionPublic"}
    public = spec["components"]["schemas"]["PredictionPublic"]["properties"]
    assert {name for name, p in public.items() if p.get("examples")} >= {"label", "confidence", "model_name"}
    assert any(p.get("examples") for p in spec["components"]["schemas"]["ModelPublic"]["properties"].values())

    # The documented request is one the service answers, with what the document says it answers.
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    assert conforms(spec, answer, response.json()) == []
    assert len(response.json()["predictions"]) == len(body["samples"])


def test_request_id_and_tags_are_echoed_and_stored(client: TestClient, data: digits.Digits) -> None:
    response = client.post(
        "/predict",
        json={"samples": [data.images[9].tolist()], "tags": {"app": "api-test"}},
        headers={"X-Request-ID": "req-42"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["request_id"] == "req-42"
    prediction_id = response.json()["predictions"][0]["id"]
    # Not ingested (no worker in this module): it is found in the Redis stream.
    stored = client.get(f"/predictions/{prediction_id}")
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["ingested"] is False
    assert body["request_id"] == "req-42"
    assert body["tags"] == {"app": "api-test"}
    assert body["input"] == data.images[9].tolist()
    assert body["label"] == str(data.labels[9])


def test_a_request_id_is_made_up_when_none_is_sent(client: TestClient, data: digits.Digits) -> None:
    first = client.post("/predict", json={"samples": [data.images[0].tolist()]}).json()["request_id"]
    second = client.post("/predict", json={"samples": [data.images[0].tolist()]}).json()["request_id"]
    assert first and second and first != second


@pytest.mark.parametrize(
    ("tags", "fragment"),
    [
        ({"k": "v" * 257}, "at most 256 characters"),
        ({"": "v"}, "at least 1 character"),
        ({f"k{i}": "v" for i in range(17)}, "at most 16 items"),
        ({"k": 3}, "valid string"),
        (["not", "a", "dict"], "Input should be an object"),
    ],
)
def test_bad_tags_get_400(client: TestClient, tags: Any, fragment: str) -> None:
    response = client.post("/predict", json={"samples": [grid(1)], "tags": tags})
    assert response.status_code == 400
    assert fragment in response.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/predictions/not-a-uuid", 422),
        ("/predictions/4b2c2f1e-8d1a-4c59-9e2a-2f3b7c1d9e00", 422),  # a UUIDv4 is never a prediction id
        ("/predictions/01a2024d-76a5-744d-b838-fcab5ce4eb37", 404),
    ],
)
def test_unknown_or_malformed_prediction_ids(client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status, response.text


def test_the_review_api_is_mounted_with_the_served_models_labels(
    client: TestClient, module_database: str, data: digits.Digits
) -> None:
    import psycopg

    from feedback import review as review_store

    assert client.get("/review/me").status_code == 401
    with psycopg.connect(module_database, autocommit=True) as conn:
        _, token = review_store.create_user(conn=conn, name="mounted", role=review_store.Role.REVIEWER)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/review/me", headers=headers).json()["name"] == "mounted"
    # The served model's signature checks added samples and labels.
    sample = data.images[3].tolist()
    assert client.post("/review/samples", json={"input": sample, "label": "3"}, headers=headers).status_code == 201
    assert client.post("/review/samples", json={"input": sample, "label": "x"}, headers=headers).status_code == 422
    bad = client.post("/review/samples", json={"input": [[1.0] * 8] * 7, "label": "3"}, headers=headers)
    assert bad.status_code == 422 and "shape" in bad.text
    paths = client.get("/docs.json").json()["paths"]
    assert "/review/claim" in paths and "/review/items" in paths


def npy(array: Any) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def npz(array: Any) -> bytes:
    out = io.BytesIO()
    np.savez(out, a=array)
    return out.getvalue()


def test_npy_bodies_are_answered_like_json(client: TestClient, data: digits.Digits) -> None:
    images = data.images[:5]
    as_json = client.post("/predict", json={"samples": images.tolist()}).json()["predictions"]
    batch = client.post("/predict/npy", content=npy(images), headers={"content-type": "application/octet-stream"})
    assert batch.status_code == 200, batch.text
    assert batch.headers["x-loop-worker"] and batch.headers["x-request-id"]
    answers = batch.json()["predictions"]
    assert [p["label"] for p in answers] == [p["label"] for p in as_json]
    for got, want in zip(answers, as_json, strict=True):
        assert got["scores"] == pytest.approx(want["scores"])
    one = client.post("/predict/npy", content=npy(images[0]), headers={"x-request-id": "npy-1"})
    assert one.status_code == 200 and one.json()["request_id"] == "npy-1"
    assert [p["label"] for p in one.json()["predictions"]] == [as_json[0]["label"]]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not npy at all", 400, "not an .npy array"),
        (b"", 400, "not an .npy array"),
        (npy(np.array([{"a": 1}], dtype=object)), 400, "not an .npy array"),
        (npy(np.zeros((2, 7, 8), np.float32)), 400, "shape [8, 8]"),
        (npy(np.full((1, 8, 8), 99, np.float32)), 400, "outside the range"),
        (npy(np.full((1, 8, 8), np.nan, np.float32)), 400, "non-finite"),
        (npy(np.zeros((300, 8, 8), np.float32)), 400, "too many samples"),
        (npy(np.array(["a"] * 64).reshape(1, 8, 8)), 400, "only numbers"),
        (b"\x93NUMPY" + b"\x00" * (5 * 2**20), 413, "over the limit"),
        (npy(np.float32(3)), 400, "0-d"),
        (npz(np.zeros((1, 8, 8))), 400, "zip archive"),
        (npy(np.zeros((1, 8, 8), np.float32)).replace(b"(1, 8, 8)", b"(100000000, 8, 8)")[:300], 400, "declares shape"),
    ],
)
def test_bad_npy_bodies_get_4xx_naming_the_problem(client: TestClient, body: bytes, status: int, fragment: str) -> None:
    response = client.post("/predict/npy", content=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


# -- answered means kept: what would be refused downstream is refused at the door ------------------


def stream_length(keys: Keys) -> int:
    with redis.Redis.from_url(REDIS) as r:
        return int(r.xlen(keys.stream))


def ingest_everything(keys: Keys, database_url: str) -> None:
    """Run the ingest worker over the module's stream until it is drained."""
    with redis.Redis.from_url(REDIS) as r:
        worker = IngestWorker(
            redis_client=r, connect=lambda: psycopg.connect(database_url, autocommit=True), keys=keys, consumer="t",
            config=IngestConfig(block_ms=10),
        )  # fmt: skip
        try:
            while worker.step():  # the rounds `loop ingest` runs, until one finds nothing
                pass
        finally:
            worker.close()


def stored_ids(database_url: str, ids: list[str]) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id::text FROM predictions WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
    return {r[0] for r in rows}


UNSTORABLE_TAGS: list[tuple[str, bytes, str]] = [
    ("NUL in a value", b'{"a": "x\\u0000y"}', "U+0000"),
    ("NUL in a key", b'{"a\\u0000": "x"}', "U+0000"),
    ("lone surrogate in a value", b'{"a": "x\\ud800"}', "Invalid JSON"),
    ("lone low surrogate in a key", b'{"\\udc00": "x"}', "Invalid JSON"),
]


@pytest.mark.parametrize(("case", "tags", "fragment"), UNSTORABLE_TAGS, ids=[c[0] for c in UNSTORABLE_TAGS])
def test_tags_postgres_would_refuse_get_400_and_nothing_is_stored(
    client: TestClient, module_keys: Keys, case: str, tags: bytes, fragment: str
) -> None:
    before = stream_length(module_keys)
    body = b'{"samples": [' + json.dumps(grid(1)).encode() + b'], "tags": ' + tags + b"}"
    response = post_raw(client, body)
    assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
    assert fragment in response.text
    assert stream_length(module_keys) == before


@pytest.mark.parametrize(
    ("content_type", "status", "fragment"),
    [
        ("multipart/form-data", 400, "Missing boundary"),
        ("multipart/form-data; boundary=b0undary", 415, "application/json"),  # the digits model takes numbers
        ("application/x-www-form-urlencoded", 415, "application/json"),
    ],
)
def test_a_form_body_for_a_tensor_model_gets_4xx(
    client: TestClient, module_keys: Keys, content_type: str, status: int, fragment: str
) -> None:
    before = stream_length(module_keys)
    body = b'--b0undary\r\nContent-Disposition: form-data; name="samples"\r\n\r\n[]\r\n--b0undary--\r\n'
    response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert stream_length(module_keys) == before


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(client: TestClient, module_keys: Keys) -> None:
    before = stream_length(module_keys)
    body = b'{"samples": [' + b",".join([json.dumps(grid(1)).encode()] * 40_000) + b"]}"  # 8 MB of valid JSON
    response = post_raw(client, body)
    assert response.status_code == 413, response.text
    # Refused on its Content-Length, by the limits in front of the app: the route never saw it.
    assert f"the body of {len(body)} bytes is over the limit of 4194304 bytes" in response.json()["detail"]
    assert stream_length(module_keys) == before


@pytest.mark.parametrize(
    ("sample", "fragment"),
    [
        ([*grid(1)[:3], [1, 1, 1, True, 1, 1, 1, 1], *grid(1)[4:]], "contains true/false"),
        (grid(16.00000001), "value 16.00000001 outside the range [0, 16]"),
        (grid(1e308), "value 1e+308 outside the range [0, 16]"),
    ],
)
def test_values_are_checked_as_sent_on_predict_and_added_samples(
    client: TestClient, module_database: str, module_keys: Keys, sample: Any, fragment: str
) -> None:
    from feedback import review as review_store

    before = stream_length(module_keys)
    response = client.post("/predict", json={"samples": [sample]})
    assert response.status_code == 400 and fragment in response.text, response.text
    assert stream_length(module_keys) == before
    with psycopg.connect(module_database, autocommit=True) as conn:
        _, token = review_store.create_user(conn=conn, name=f"v{uuid.uuid4().hex[:8]}", role=review_store.Role.REVIEWER)
    added = client.post(
        "/review/samples", json={"input": sample, "label": "3"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert added.status_code == 422 and fragment in added.text, added.text


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tags=st.dictionaries(
        st.text(st.characters(codec=None), min_size=0, max_size=70),
        st.text(st.characters(codec=None), max_size=300),
        max_size=18,
    )
)
def test_every_prediction_answered_200_is_stored_whatever_the_tags(
    client: TestClient, module_database: str, module_keys: Keys, tags: dict[str, str]
) -> None:
    # json.dumps writes lone surrogates as \\uD800 escapes, as a hostile client would.
    body = json.dumps({"samples": [grid(2)], "tags": tags}).encode()
    response = post_raw(client, body)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert "tags" in response.text or "Invalid JSON" in response.text, response.text
        return
    (answer,) = response.json()["predictions"]
    ingest_everything(module_keys, module_database)
    assert stored_ids(module_database, [answer["id"]]) == {answer["id"]}, f"answered, never stored: tags={tags!r}"
    with redis.Redis.from_url(REDIS) as r:
        assert r.xlen(module_keys.dead_letters) == 0


# -- images in ---------------------------------------------------------------------------------------


def png(size: tuple[int, int] = (20, 12), seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format=fmt)
    return out.getvalue()


def test_an_uploaded_png_is_answered_stored_as_sent_and_reviewable(
    client: TestClient, module_database: str, module_keys: Keys, image_model: store.StoredModel
) -> None:
    from feedback import review as review_store

    sent = png(seed=1)
    response = client.post(
        "/predict", files=[("image", ("a.png", sent, "image/png"))], data={"model": image_model.name,
                                                                          "tags": '{"camera": "left"}'},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    (answer,) = response.json()["predictions"]
    assert answer["model_name"] == image_model.name and answer["label"] in IMAGE_CLASSES
    # Before and after ingest, the image comes back byte for byte.
    for _ in range(2):
        raw = client.get(f"/predictions/{answer['id']}/input")
        assert raw.status_code == 200 and raw.content == sent and raw.headers["content-type"] == "image/png"
        stored = client.get(f"/predictions/{answer['id']}").json()
        assert stored["input_type"] == "image/png" and stored["tags"] == {"camera": "left"}
        assert base64.b64decode(stored["input"]["base64"]) == sent
        ingest_everything(module_keys, module_database)
    assert client.get(f"/predictions/{answer['id']}").json()["ingested"] is True

    with psycopg.connect(module_database, autocommit=True) as conn:
        _, token = review_store.create_user(conn=conn, name="image-reviewer", role=review_store.Role.REVIEWER)
    headers = {"Authorization": f"Bearer {token}"}
    claimed = client.post("/review/claim", json={"count": 100}, headers=headers).json()
    (item,) = [c for c in claimed if c["id"] == answer["id"]]
    assert item["input"] == {"media_type": "image/png", "base64": base64.b64encode(sent).decode()}
    verdict = {"prediction_id": answer["id"], "verdict": "wrong",
               "label": next(c for c in IMAGE_CLASSES if c != answer["label"])}  # fmt: skip
    judged = client.post("/review/verdicts", json={"verdicts": [verdict]}, headers=headers)
    assert judged.status_code == 200, judged.text
    assert judged.json()[0]["label"] == verdict["label"]


def test_base64_images_in_json_and_several_files(client: TestClient, image_model: store.StoredModel) -> None:
    first, second = png(seed=2), png(seed=3, fmt="JPEG")
    as_json = client.post("/predict", json={"model": image_model.name, "samples": [
        base64.b64encode(first).decode(), "data:image/jpeg;base64," + base64.b64encode(second).decode()]})  # fmt: skip
    assert as_json.status_code == 200, as_json.text
    as_files = client.post("/predict", data={"model": image_model.name},
                           files=[("a", ("a.png", first)), ("b", ("b.jpg", second))])  # fmt: skip
    assert as_files.status_code == 200, as_files.text
    for got, want in zip(as_files.json()["predictions"], as_json.json()["predictions"], strict=True):
        assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"])
    ids = [p["id"] for p in as_json.json()["predictions"]]
    assert client.get(f"/predictions/{ids[1]}/input").headers["content-type"] == "image/jpeg"


def _bomb() -> bytes:
    data = bytearray(png())
    data[16:24] = (60_000).to_bytes(4, "big") * 2  # IHDR: 60,000 x 60,000 pixels
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="GIF")
    return out.getvalue()


@pytest.mark.parametrize(
    ("files", "status", "fragment"),
    [
        ([("a", ("a.png", b"not an image"))], 400, "samples[0]: not an image in an accepted format"),
        ([("a", ("a.png", png(size=(64, 64))[:300]))], 400, "truncated or corrupt"),
        ([("a", ("a.gif", _gif()))], 400, "not an image in an accepted format"),
        ([("a", ("a.png", png(size=(400, 400))))], 400, "400x400 = 160000 pixels, over the limit of 100000"),
        ([("a", ("a.png", _bomb()))], 400, "pixels"),
        ([("a", ("a.png", png()))] * (MAX_SAMPLES + 1), 400, "Too many files"),
        ([("a", ("a.png", png(), "image/png")), ("b", ("b.txt", b"hello"))], 400, "samples[1]"),
        ([("a", ("a.png", b"\x00" * (5 * 2**20)))], 413, "over the limit of 4194304 bytes"),
        ([], 400, "no files"),
    ],
)
def test_bad_uploads_get_4xx_and_nothing_is_stored(
    client: TestClient, module_keys: Keys, image_model: store.StoredModel, files: Any, status: int, fragment: str
) -> None:
    before = stream_length(module_keys)
    response = client.post("/predict", data={"model": image_model.name}, files=files or {"": ("", b"")})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert stream_length(module_keys) == before


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"samples": ["%%% not base64"]}, "samples[0] is not base64 text"),
        ({"samples": [[1, 2, 3]]}, "samples[0] is not an image"),
        ({"samples": [base64.b64encode(b"plain text").decode()]}, "samples[0]: not an image"),
    ],
)
def test_bad_json_images_get_400(
    client: TestClient, module_keys: Keys, image_model: store.StoredModel, body: dict[str, Any], fragment: str
) -> None:
    before = stream_length(module_keys)
    response = client.post("/predict", json={**body, "model": image_model.name})
    assert response.status_code == 400 and fragment in response.json()["detail"], response.text
    assert stream_length(module_keys) == before


def test_each_model_takes_only_its_own_kind_of_input(client: TestClient, module_keys: Keys) -> None:
    before = stream_length(module_keys)
    files = client.post("/predict", files=[("a", ("a.png", png(), "image/png"))])  # the default: digits
    assert files.status_code == 415 and "takes numbers" in files.json()["detail"]
    text = client.post("/predict", json={"samples": [base64.b64encode(png()).decode()]})
    assert text.status_code == 400 and "takes numbers, not images" in text.json()["detail"]
    assert stream_length(module_keys) == before
