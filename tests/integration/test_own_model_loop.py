"""A team's own classifier, brought without any data, goes round the loop as itself.

It is imported as exported (its graph ends in a Softmax: it answers probabilities), served,
its predictions judged by a reviewer; the first compile draws the frozen validation version from
those verdicts, the fine-tuning trainer trains the imported graph itself, the gate compares it
with the imported version on that validation version, and the running service swaps to it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import psycopg
import pytest

from feedback import review as rs
from models import store
from models.trainers import FINE_TUNE
from tests.graphs import linear_classifier
from tests.integration.conftest import RunningService
from tests.integration.test_image_loop import _wait, judge_all, loop
from tests.model.test_finetune import blobs

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

MODEL = "team-blobs"
CLASSES = ["0", "90", "180"]
SPEC = """\
input:
  kind: tensor
  shape: [3, 6, 8]
  min_value: -4
  max_value: 4
classes: [0, 90, 180]   # numbers are class names too
onnx_input: image
onnx_output: logits
output_kind: probabilities
"""


@pytest.mark.timeout(600)  # two `loop` processes (torch, MLflow) and a fine-tune, on two cores
def test_a_model_without_data_is_fine_tuned_from_verdicts_and_swapped_in(
    start_service: Callable[..., RunningService], service_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    graph = linear_classifier(tmp_path / "team.onnx", softmax=True, weight_scale=0.01)
    (tmp_path / "team.yaml").write_text(SPEC)
    env = {**service_env, "LOOP_MODEL_NAME": MODEL, "LOOP_MODEL_TAG": "champion"}
    imported = loop(env, "models", "import", MODEL, "--onnx", str(graph), "--spec", str(tmp_path / "team.yaml"))
    assert "output probabilities" in imported and f"LOOP_MODELS={MODEL}" in imported
    first = store.get(f"{MODEL}:latest").version

    service = start_service(
        LOOP_MODELS=MODEL, LOOP_MODEL_NAME=MODEL, LOOP_MODEL_TAG="champion", LOOP_REVIEW_OVERLAP_SHARE="0"
    )
    http = httpx.Client(base_url=service.url, timeout=30)
    traffic = blobs(seed=5, per_class=30)
    truth: dict[str, str] = {}
    for start in range(0, len(traffic.labels), 10):
        samples = np.clip(traffic.inputs[start : start + 10], -4, 4).tolist()
        answered = http.post("/predict", json={"samples": samples})
        assert answered.status_code == 200, answered.text
        for prediction, label in zip(answered.json()["predictions"], traffic.labels[start : start + 10], strict=True):
            assert prediction["model_version"] == first
            assert abs(sum(prediction["scores"].values()) - 1) < 1e-5
            truth[prediction["id"]] = CLASSES[label]

    with psycopg.connect(database_url, autocommit=True) as conn:
        _, reviewer = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
        _, admin = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    as_reviewer, as_admin = {"Authorization": f"Bearer {reviewer}"}, {"Authorization": f"Bearer {admin}"}
    _wait(lambda: http.get("/review/counts", headers=as_reviewer).json()["unmoderated"] == len(truth), "ingest")
    judge_all(http, truth, as_reviewer)

    # The first compile freezes the validation version from the verdicts; the rest is training data.
    compiled = http.post("/admin/datasets", params={"model": MODEL}, json={}, headers=as_admin)
    assert compiled.status_code == 201, compiled.text
    training = compiled.json()
    (validation,) = http.get("/admin/datasets", params={"model": MODEL, "kind": "validation"}, headers=as_admin).json()
    assert validation["manifest"]["source"]["verdicts"]["judged"] == len(truth)
    assert validation["per_class"] == {name: 6 for name in CLASSES}  # 20% of 30 each
    assert training["rows"] == len(truth) - validation["rows"] and training["manifest"]["filters"]["original"] is None

    # Without a trainer the refusal names the one that works; with it, the imported graph is fine-tuned.
    refused = loop_fails(env, "retrain", "--model", MODEL, "--dataset", training["id"])
    assert f"--trainer {FINE_TUNE}" in refused
    tuned = loop(env, "retrain", "--model", MODEL, "--dataset", training["id"], "--trainer", FINE_TUNE,
                 "--epochs", "20")  # fmt: skip
    assert "promoted: accuracy" in tuned, tuned
    second = re.search(rf"{MODEL}:(\w+): validation accuracy", tuned)
    assert second is not None
    promotions = http.get("/admin/promotions", params={"model": MODEL}, headers=as_admin).json()
    (baseline, promoted) = promotions
    assert (baseline["decision"], baseline["model_version"]) == ("baseline", first)
    assert (promoted["decision"], promoted["model_version"]) == ("promoted", second.group(1))
    logger.info("validation accuracy: imported %.4f, fine-tuned %.4f (%d validation items from verdicts)",
                baseline["accuracy"], promoted["accuracy"], validation["rows"])  # fmt: skip
    assert promoted["accuracy"] > baseline["accuracy"] + 0.3

    # The stored candidate is the team's graph with new weights: the same operators, the Softmax kept.
    candidate = store.get(f"{MODEL}:{second.group(1)}")
    assert candidate.card.model_spec.trainer == FINE_TUNE and candidate.card.extra["base_version"] == first
    assert [n.op_type for n in onnx.load(str(candidate.onnx_path)).graph.node] == [
        n.op_type for n in onnx.load(str(graph)).graph.node
    ]
    _wait(lambda: http.get(f"/models/{MODEL}").json()["version"] == second.group(1), "the service to swap")
    answer = http.post("/predict", json={"samples": np.clip(traffic.inputs[:1], -4, 4).tolist()}).json()
    assert answer["predictions"][0]["model_version"] == second.group(1)


def loop_fails(env: dict[str, str], *args: str) -> str:
    """Run a `loop` command that must fail; its error output."""
    import os
    import subprocess
    import sys

    from tests.integration.conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode != 0, f"loop {' '.join(args)} should have failed:\n{done.stdout}"
    return done.stderr
