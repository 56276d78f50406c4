"""The loop for an image model, end to end: the built-in shapes model from its own data to a hot swap.

PNG uploads are stored as sent, reviewers correct them over HTTP, a compiled version holds the
image files (and `dvc_data` computes its id), the image trainer retrains, the gate promotes and
the running service answers with the new version.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from feedback import review as rs
from feedback.datasets import image_file, read_version
from models import builtin, shapes
from models.pipeline import BuildResult
from tests.integration.conftest import ROOT, RunningService

pytestmark = pytest.mark.integration

MODEL = "shapes-cnn"
TRAFFIC_PER_CLASS = 8


def loop(env: dict[str, str], *args: str) -> str:
    """Run a `loop` command as a user would; its output, or the test fails with it."""
    done = subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"loop {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_shapes_model_goes_round_the_loop(
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    service_env: dict[str, str],
    database_url: str,
    tmp_path: Path,
) -> None:
    assert MODEL in builtin.DEMO_DATA["shapes"].model_name
    env = {**service_env, "LOOP_MODEL_NAME": MODEL, "LOOP_MODEL_TAG": "champion"}
    loop(env, "demo-data", "shapes", str(tmp_path / "shapes"), "--per-class", "16")
    imported = loop(env, "datasets", "import", MODEL, str(tmp_path / "shapes"))
    assert "original" in imported and "validation" in imported and "(frozen)" in imported
    first = loop(env, "train", "--model", MODEL, "--epochs", "2")
    assert "promoted: no champion yet" in first
    first_version = first.split(f"{MODEL}:")[1].split(":")[0]

    service = start_service(
        LOOP_MODELS=f"{trained_model.stored.tag},{MODEL}",  # digits the default, shapes beside it
        LOOP_REVIEW_OVERLAP_SHARE="0",
        LOOP_MODEL_NAME=trained_model.stored.name,
    )
    http = httpx.Client(base_url=service.url, timeout=30)
    assert http.get(f"/models/{MODEL}").json()["version"] == first_version

    truth, sent = upload_traffic(http, tmp_path / "traffic", first_version)
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, reviewer = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
        _, admin = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    as_reviewer = {"Authorization": f"Bearer {reviewer}"}
    as_admin = {"Authorization": f"Bearer {admin}"}
    _wait(lambda: http.get("/review/counts", headers=as_reviewer).json()["unmoderated"] == len(truth), "uploads stored")
    erased = next(iter(truth))
    stored = http.get(f"/predictions/{erased}/input", headers=as_reviewer)
    assert stored.status_code == 200 and stored.content == sent[erased]
    assert stored.headers["content-type"] == "image/png"

    judge_all(http, truth, as_reviewer)
    add_missed_image(http, tmp_path / "traffic" / "cross" / "00001.png", as_reviewer)
    erase = http.post(f"/review/items/{erased}/erase", json={"reason": "the sender asked"}, headers=as_admin)
    assert erase.status_code == 204, erase.text

    # The compiled version: original rows and reviewed uploads as image files; DVC agrees on its id.
    compiled = http.post("/admin/datasets", params={"model": MODEL}, json={}, headers=as_admin)
    assert compiled.status_code == 201, compiled.text
    version = compiled.json()
    assert version["model_name"] == MODEL
    assert version["manifest"]["per_source"]["model"] == len(truth) - 1  # the erased one stays out
    assert version["manifest"]["per_source"]["reviewer"] == 1
    check_files(version, truth, sent, erased, tmp_path / "dvc-cache")

    # Retrain with the image trainer; the gate promotes; the running service swaps.
    second = loop(env, "retrain", "--model", MODEL, "--dataset", version["id"], "--epochs", "12")
    assert "promoted: accuracy" in second, second
    second_version = second.split(f"{MODEL}:")[1].split(":")[0]
    assert second_version != first_version
    _wait(lambda: http.get(f"/models/{MODEL}").json()["version"] == second_version, "the service to swap")
    png = (tmp_path / "traffic" / "star" / "00000.png").read_bytes()
    answer = http.post("/predict", data={"model": MODEL}, files=[("image", ("s.png", png, "image/png"))]).json()
    assert answer["predictions"][0]["model_version"] == second_version
    promotions = http.get("/admin/promotions", params={"model": MODEL}, headers=as_admin).json()
    assert [(p["model_version"], p["decision"]) for p in promotions] == [
        (first_version, "promoted"),
        (second_version, "promoted"),
    ]
    # Digits, the default model, is served unchanged beside it.
    digits_answer = http.post("/predict", json={"samples": [[[0.0] * 8] * 8]}).json()
    assert digits_answer["predictions"][0]["model_name"] == trained_model.stored.name


def upload_traffic(http: httpx.Client, folder: Path, version: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """PNG uploads of shapes the model has not seen; (class, bytes sent) by prediction id."""
    shapes.write(folder, per_class=TRAFFIC_PER_CLASS, seed=99)
    truth: dict[str, str] = {}
    sent: dict[str, bytes] = {}
    for kind in shapes.CLASS_NAMES:
        for path in sorted((folder / kind).iterdir()):
            data = path.read_bytes()
            response = http.post("/predict", data={"model": MODEL}, files=[("image", (path.name, data, "image/png"))])
            assert response.status_code == 200, response.text
            (answer,) = response.json()["predictions"]
            assert answer["model_version"] == version
            truth[answer["id"]], sent[answer["id"]] = kind, data
    return truth, sent


def add_missed_image(http: httpx.Client, path: Path, headers: dict[str, str]) -> None:
    """A reviewer adds an image the model missed (base64, for this model); a wrong kind is refused."""
    image = {"media_type": "image/png", "base64": base64.b64encode(path.read_bytes()).decode()}
    added = http.post("/review/samples", json={"model": MODEL, "image": image, "label": "cross"}, headers=headers)
    assert added.status_code == 201, added.text
    numbers = http.post("/review/samples", json={"model": MODEL, "input": [1.0], "label": "cross"}, headers=headers)
    assert numbers.status_code == 422 and "takes images" in numbers.json()["detail"]
    broken = {"model": MODEL, "image": {"media_type": "image/png", "base64": "AAAA"}, "label": "cross"}
    assert http.post("/review/samples", json=broken, headers=headers).status_code == 422


def judge_all(http: httpx.Client, truth: dict[str, str], headers: dict[str, str]) -> None:
    """A reviewer judges every item over HTTP: the right label where the model was wrong."""
    judged = 0
    while judged < len(truth):
        claimed = http.post("/review/claim", json={"count": 20}, headers=headers).json()
        assert claimed, "the queue ran dry before every item was judged"
        verdicts = [
            {"prediction_id": c["id"], "verdict": "correct"}
            if c["label"] == truth[c["id"]]
            else {"prediction_id": c["id"], "verdict": "wrong", "label": truth[c["id"]]}
            for c in claimed
        ]
        response = http.post("/review/verdicts", json={"verdicts": verdicts}, headers=headers)
        assert response.status_code == 200, response.text
        judged += len(claimed)


def check_files(
    version: dict[str, Any], truth: dict[str, str], sent: dict[str, bytes], erased: str, cache: Path
) -> None:
    """The version holds the uploads as sent, labelled as judged, the erased one left out; DVC agrees on its id."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    rows = read_version(version["uri"])
    assert erased not in rows.item_ids
    uploads = [i for i in rows.item_ids if i in truth]
    assert len(uploads) == len(truth) - 1
    for item in uploads:
        assert (Path(version["uri"]) / image_file(item, "image/png")).read_bytes() == sent[item]
        assert rows.label_names[rows.item_ids.index(item)] == truth[item]
    fs = LocalFileSystem()  # type: ignore[no-untyped-call]
    _, _, obj = build(HashFileDB(fs, str(cache)), version["uri"], fs, "md5", dry_run=True)
    assert obj.hash_info.value == f"{version['id']}.dir"


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
