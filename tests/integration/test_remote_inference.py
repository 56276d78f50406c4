"""Inference on an existing engine (LOOP_INFERENCE=remote) with `loop engine` as the engine, a
second Loop process speaking the Open Inference Protocol over HTTP and gRPC from a Triton model
repository: the same labels and scores as in-process inference for a tensor and an image model, 503s
(never 500s) while the engine is away and answers again when it is back, and a promotion followed on
the engine's side (the service writes the new version into the repository, loads it, names it)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from feedback import review as rs
from harness import free_port, spawn, stop
from models import digits, store
from models.pipeline import BuildResult
from models.runtime import DevicePreference, OnnxModel
from service.cli import main
from tests.graphs import import_shapes_model, random_png
from tests.integration.conftest import RunningService
from tests.integration.test_hot_reload import two_versions

pytestmark = pytest.mark.integration


@dataclass
class RunningEngine:
    process: Popen[bytes]
    port: int
    grpc_port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"


@pytest.fixture
def start_engine(tmp_path: Path) -> Iterator[Callable[..., RunningEngine]]:
    """Start `loop engine` processes (on the given ports, or free ones); all are stopped at the end."""
    started: list[Popen[bytes]] = []

    def start(repository: Path, port: int | None = None, grpc_port: int | None = None) -> RunningEngine:
        port, grpc_port = port or free_port(), grpc_port or free_port()
        command = [sys.executable, "-m", "service", "engine", "--repository", str(repository)]
        command += ["--port", str(port), "--grpc-port", str(grpc_port)]
        engine = RunningEngine(spawn(command, env=os.environ, log=tmp_path / f"engine-{port}.log"), port, grpc_port)
        started.append(engine.process)
        deadline = time.monotonic() + 60
        while not _answers(f"{engine.http}/v2/health/ready"):
            assert engine.process.poll() is None, (tmp_path / f"engine-{engine.port}.log").read_text()
            assert time.monotonic() < deadline, "the engine did not come up"
            time.sleep(0.1)
        return engine

    try:
        yield start
    finally:
        for process in started:
            stop(process, timeout_s=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def export(name: str, version: str, repository: Path) -> None:
    done = CliRunner().invoke(main, ["models", "export-triton", name, str(repository), "--version", version])
    assert done.exit_code == 0, done.output


def answers(service: RunningService, name: str, samples: list[Any], images: list[bytes]) -> list[dict[str, Any]]:
    """The predictions of the tensor samples (by `name`) and then of the images (the other model)."""
    with httpx.Client(base_url=service.url, timeout=30) as http:
        tensors = http.post("/predict", json={"samples": samples, "model": name})
        files = [("files", (f"{n}.png", data, "image/png")) for n, data in enumerate(images)]
        pictures = http.post("/predict/files", files=files)
    assert tensors.status_code == 200 and pictures.status_code == 200, (tensors.text, pictures.text)
    return [*tensors.json()["predictions"], *pictures.json()["predictions"]]


def assert_same(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for remote, local in zip(got, expected, strict=True):
        assert (remote["model_name"], remote["model_version"]) == (local["model_name"], local["model_version"])
        assert remote["label"] == local["label"]
        assert remote["scores"].keys() == local["scores"].keys()
        for label, score in local["scores"].items():
            assert abs(remote["scores"][label] - score) <= 1e-6, (label, remote["scores"][label], score)


def test_remote_inference_answers_as_in_process_and_503s_while_the_engine_is_away(
    start_service: Callable[..., RunningService],
    start_engine: Callable[..., RunningEngine],
    trained_model: BuildResult,
    tmp_path: Path,
) -> None:
    tensor_model = trained_model.stored
    image_model = import_shapes_model(tmp_path, f"shapes-remote-{uuid.uuid4().hex[:8]}")
    repository = tmp_path / "repository"
    for stored in (tensor_model, image_model):
        export(stored.name, stored.version, repository)
    engine = start_engine(repository)
    served = f"{image_model.name}:{image_model.version},{tensor_model.name}:{tensor_model.version}"
    local = start_service(LOOP_MODELS=served)
    remote = start_service(LOOP_MODELS=served, LOOP_INFERENCE="remote", LOOP_INFERENCE_URL=engine.http)

    listed = httpx.get(f"{remote.url}/models", timeout=10).json()["models"]
    assert {m["provider"] for m in listed} == {f"remote:{engine.http}"}
    assert all(
        m["reference"]["samples"] > 0 and m["reference"]["max_abs_diff"] <= 1e-6 for m in listed
    )  # on the engine
    samples = [image.tolist() for image in digits.load().images[:32]]
    images = [random_png(seed, size=(20 + seed, 24)) for seed in range(12)]
    expected = answers(local, tensor_model.name, samples, images)
    assert_same(answers(remote, tensor_model.name, samples, images), expected)
    assert {p["label"] for p in expected[:32]} != {expected[0]["label"]}  # not one answer for everything

    stop(engine.process, timeout_s=30)
    statuses = []
    for _ in range(10):
        answer = httpx.post(f"{remote.url}/predict", json={"samples": samples[:2], "model": tensor_model.name})
        statuses.append(answer.status_code)
    assert set(statuses) == {503}, statuses
    assert "inference engine" in answer.json()["detail"]
    start_engine(repository, port=engine.port, grpc_port=engine.grpc_port)
    deadline = time.monotonic() + 30
    while (
        httpx.post(f"{remote.url}/predict", json={"samples": samples[:1], "model": tensor_model.name}).status_code
        != 200
    ):
        assert time.monotonic() < deadline, "the service did not answer again once the engine was back"
        time.sleep(0.2)
    assert_same(answers(remote, tensor_model.name, samples, images), expected)


def test_a_promotion_is_followed_on_the_engine_over_grpc(
    start_service: Callable[..., RunningService],
    start_engine: Callable[..., RunningEngine],
    trained_model: BuildResult,
    database_url: str,
    tmp_path: Path,
) -> None:
    old, new = two_versions(trained_model.stored, tmp_path, database_url, "remote")
    name, card = old.name, old.card
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, admin = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    repository = tmp_path / "repository"
    repository.mkdir()
    engine = start_engine(repository)
    service = start_service(
        LOOP_MODEL_NAME=name, LOOP_MODEL_TAG="champion", LOOP_INFERENCE="remote",
        LOOP_INFERENCE_URL=engine.grpc, LOOP_INFERENCE_REPOSITORY=str(repository),
    )  # fmt: skip
    samples = digits.load().images[:40].astype(np.float32)

    def labels_of(version: str) -> list[str]:
        logits = OnnxModel(store.get(f"{name}:{version}").onnx_path, device=DevicePreference.CPU).run(samples)
        return [card.signature.class_names[i] for i in logits.argmax(axis=1)]

    def predicted() -> tuple[set[str], list[str]]:
        answer = httpx.post(f"{service.url}/predict", json={"samples": samples.tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        found = answer.json()["predictions"]
        return {p["model_version"] for p in found}, [p["label"] for p in found]

    assert (repository / name / "1" / "model.onnx").read_bytes() == old.onnx_path.read_bytes()
    assert predicted() == ({old.version}, labels_of(old.version))
    promoted = httpx.post(
        f"{service.url}/admin/models/{new.version}/promote", params={"model": name},
        json={"reason": "remote test"}, headers={"Authorization": f"Bearer {admin}"}, timeout=30,
    )  # fmt: skip
    assert promoted.status_code == 200, promoted.text
    deadline = time.monotonic() + 15
    while httpx.get(f"{service.url}/models/{name}", timeout=10).json()["version"] != new.version:
        assert time.monotonic() < deadline, "the service did not follow the promotion"
        time.sleep(0.2)
    assert (repository / name / "2" / "model.onnx").read_bytes() == new.onnx_path.read_bytes()
    assert labels_of(new.version) != labels_of(old.version)  # the two versions tell apart
    assert predicted() == ({new.version}, labels_of(new.version))
    index = httpclient.InferenceServerClient(f"127.0.0.1:{engine.port}").get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {(name, "1", "READY"), (name, "2", "READY")}


def test_the_engine_speaks_the_protocol_to_tritons_clients_and_refuses_clearly(
    start_engine: Callable[..., RunningEngine], trained_model: BuildResult, tmp_path: Path
) -> None:
    stored = trained_model.stored
    export(stored.name, stored.version, tmp_path / "repository")
    engine = start_engine(tmp_path / "repository")
    number = str(store.version_number(stored))
    batch = digits.load().images[:5].astype(np.float32)
    expected = OnnxModel(stored.onnx_path, device=DevicePreference.CPU).run(batch)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{engine.port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{engine.grpc_port}")
    for client, module, extra in ((http, httpclient, {"binary_data": True}), (grpc, grpcclient, {})):
        assert client.is_server_live() and client.is_model_ready(stored.name, number)
        assert not client.is_model_ready(stored.name, "99") and not client.is_model_ready("nobody")
        metadata = client.get_model_metadata(stored.name, number, **({"as_json": True} if client is grpc else {}))
        assert [t["name"] for t in metadata["inputs"]] == ["input"] and metadata["outputs"][0]["name"] == "logits"
        given = module.InferInput("input", list(batch.shape), "FP32")
        given.set_data_from_numpy(batch, **extra)
        result = client.infer(stored.name, [given], model_version=number)
        np.testing.assert_array_equal(result.as_numpy("logits"), expected)
        wrong = module.InferInput("pixels", list(batch.shape), "FP32")
        wrong.set_data_from_numpy(batch, **extra)
        with pytest.raises(InferenceServerException, match="takes one input named 'input'"):
            client.infer(stored.name, [wrong])
        flat = module.InferInput("input", [5, 64], "FP32")
        flat.set_data_from_numpy(batch.reshape(5, 64), **extra)
        with pytest.raises(InferenceServerException, match=r"dims \[-1, 8, 8\]"):
            client.infer(stored.name, [flat])
        with pytest.raises(InferenceServerException, match="unknown model 'nobody'"):
            client.infer("nobody", [given])
        with pytest.raises(InferenceServerException, match="has no version '7'"):
            client.infer(stored.name, [given], model_version="7")
    unknown_output = httpx.post(
        f"{engine.http}/v2/models/{stored.name}/infer",
        json={"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
              "outputs": [{"name": "probabilities"}]},
    )  # fmt: skip
    assert unknown_output.status_code == 400 and "the outputs are logits" in unknown_output.json()["error"]
