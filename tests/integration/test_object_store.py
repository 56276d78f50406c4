"""Large inputs in the object store, on a local folder and on an S3-compatible server (moto's, started
on a free port): an image prediction's bytes are there and not in Postgres, come back byte for
byte from `/predictions/{id}/input`, a reviewer's claim and the compiled dataset versions, and
erasure deletes the object once no other prediction names the same bytes."""

from __future__ import annotations

import base64
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import psycopg
import pytest

from feedback import review as rs
from feedback.datasets import read_version
from feedback.errors import Unavailable
from feedback.predictions.blobs import BlobStore
from harness import free_port, processes
from models import store
from tests.graphs import SHAPES, import_shapes_model, random_png
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    return import_shapes_model(tmp_path_factory.mktemp("blobs"), "team-shapes-blobs")


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3-compatible server on a free port with a bucket; the environment points boto at it."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with processes.running(command, {}, ready_url=f"{url}/moto-api/", log=tmp_path / "moto.log"):
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket="predictions")
        yield "s3://predictions/inputs"


@pytest.fixture(params=["folder", "s3"])
def blob_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_server"))
    return str(tmp_path / "objects")


def predict(service: RunningService, images: list[bytes]) -> list[str]:
    files = [("files", (f"{n}.png", data, "image/png")) for n, data in enumerate(images)]
    answer = httpx.post(f"{service.url}/predict/files", files=files, timeout=30)
    assert answer.status_code == 200, answer.text
    return [p["id"] for p in answer.json()["predictions"]]


def judge_all(service: RunningService, token: str, sent: dict[str, bytes]) -> None:
    """Claim every item (its input must be the one sent) and label them round the classes."""
    headers = {"Authorization": f"Bearer {token}"}
    claimed = httpx.post(f"{service.url}/review/claim", json={"count": 100}, headers=headers).json()
    assert {c["id"]: base64.b64decode(c["input"]["base64"]) for c in claimed} == sent
    verdicts = []
    for n, item in enumerate(claimed):
        wanted = SHAPES[n % len(SHAPES)]
        verdicts.append({"prediction_id": item["id"], "verdict": "correct"} if item["label"] == wanted
                        else {"prediction_id": item["id"], "verdict": "wrong", "label": wanted})  # fmt: skip
    judged = httpx.post(f"{service.url}/review/verdicts", json={"verdicts": verdicts}, headers=headers)
    assert judged.status_code == 200, judged.text


def compiled_images(service: RunningService, token: str, model: str) -> dict[str, bytes]:
    """The images of the model's compiled versions (the validation version drawn from the judged
    items, and the training version), by item."""
    headers = {"Authorization": f"Bearer {token}"}
    compiled = httpx.post(f"{service.url}/admin/datasets", params={"model": model}, json={}, headers=headers,
                          timeout=60)  # fmt: skip
    assert compiled.status_code == 201, compiled.text
    written: dict[str, bytes] = {}
    for version in httpx.get(f"{service.url}/admin/datasets", params={"model": model}, headers=headers).json():
        rows = read_version(version["uri"])
        written |= {i: b.data for i, b in zip(rows.item_ids, rows.blobs or [], strict=True)}
    return written


def test_image_inputs_live_in_the_object_store(
    start_service: Callable[..., RunningService], image_model: store.StoredModel, database_url: str, blob_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, admin = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
        _, reviewer = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
    service = start_service(LOOP_MODELS=image_model.tag, LOOP_BLOB_URL=blob_url, LOOP_REVIEW_OVERLAP_SHARE="0")
    images = [random_png(seed, (48, 48)) for seed in range(24)]
    ids = predict(service, images) + predict(service, images[:1])  # the same bytes twice: one object
    sent = dict(zip(ids, [*images, images[0]], strict=True))
    deadline = time.monotonic() + 30
    while not all(httpx.get(f"{service.url}/predictions/{i}").json()["ingested"] for i in ids):
        assert time.monotonic() < deadline, "the predictions were not ingested"
        time.sleep(0.2)

    objects = BlobStore(blob_url, min_bytes=1)
    with psycopg.connect(database_url) as conn:
        rows = {
            str(r[0]): r[1:]
            for r in conn.execute("SELECT id, input, input_key, input_size, input_sha256, input_type FROM predictions")
        }
    for item, data in sent.items():
        digest = hashlib.sha256(data).hexdigest()
        assert rows[item] == (None, BlobStore.key(digest), len(data), digest, "image/png")  # not in Postgres
        assert objects.get(BlobStore.key(digest)) == data
        served = httpx.get(f"{service.url}/predictions/{item}/input")
        assert served.content == data and served.headers["content-type"] == "image/png"

    judge_all(service, reviewer, sent)  # the claim reads through the store
    assert compiled_images(service, admin, image_model.name) == sent  # so does compiling, byte for byte

    erase = {"Authorization": f"Bearer {admin}"}
    key = BlobStore.key(hashlib.sha256(images[0]).hexdigest())
    erased = httpx.post(f"{service.url}/review/items/{ids[0]}/erase", json={"reason": "request"}, headers=erase)
    assert erased.status_code == 204, erased.text
    assert httpx.get(f"{service.url}/predictions/{ids[0]}/input").status_code == 404
    assert objects.get(key) == images[0]  # the last prediction still names the same bytes
    httpx.post(f"{service.url}/review/items/{ids[-1]}/erase", json={"reason": "request"}, headers=erase)
    with pytest.raises(Unavailable, match="missing"):
        objects.get(key)
    assert httpx.get(f"{service.url}/predictions/{ids[1]}/input").content == images[1]
