"""Behaviour of the trained default model, through the same store and runtime the service uses."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from models import digits, export, store
from models.network import DigitsCNN
from models.pipeline import BuildResult
from models.runtime import DevicePreference, OnnxModel
from models.signature import postprocess
from models.train import Normalised, TrainConfig, predict_logits, train
from models.trainers import new_digits_model

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def validation(trained_model: BuildResult, split_path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = digits.load()
    split = digits.load_or_create_split(split_path, data, seed=0)
    assert split.split_id == trained_model.stored.card.validation_id
    idx = np.asarray(split.validation_indices)
    return data.images[idx], data.labels[idx]


def test_validation_accuracy_is_at_least_95_percent(trained_model: BuildResult) -> None:
    assert trained_model.evaluation.accuracy >= 0.95
    assert trained_model.evaluation.samples == 360


def test_stored_onnx_model_reproduces_the_recorded_accuracy(
    trained_model: BuildResult, validation: tuple[np.ndarray, np.ndarray]
) -> None:
    loaded = store.get(trained_model.stored.tag)
    runtime = OnnxModel(loaded.onnx_path, device=DevicePreference.CPU)
    x, y = validation
    accuracy = float((postprocess(runtime.run(x)).labels == y).mean())
    assert accuracy == pytest.approx(loaded.card.metrics["accuracy"], abs=1 / len(y))
    assert accuracy >= 0.95


def test_store_round_trip_keeps_the_card(trained_model: BuildResult) -> None:
    latest = store.get(f"{trained_model.stored.name}:latest")
    by_version = store.get(trained_model.stored.tag)
    assert by_version.card == trained_model.stored.card
    assert latest.version == trained_model.stored.version
    card = by_version.card
    assert card.signature.input_shape == (8, 8)
    assert card.signature.class_names == digits.CLASS_NAMES
    assert card.opset == export.OPSET
    assert card.dataset_id == digits.load().dataset_id
    assert card.validation_id.startswith("val-")
    assert card.parity_max_abs_diff <= export.PARITY_TOLERANCE


def test_unknown_models_are_reported_by_name() -> None:
    with pytest.raises(store.ModelNotFound, match="no-such-model"):
        store.get("no-such-model:latest")


def test_onnx_batch_axis_is_dynamic(trained_model: BuildResult) -> None:
    runtime = OnnxModel(trained_model.stored.onnx_path, device=DevicePreference.CPU)
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        out = runtime.run(rng.uniform(0, 16, size=(n, 8, 8)).astype(np.float32))
        assert out.shape == (n, 10)


def test_answers_do_not_depend_on_batch_company(
    trained_model: BuildResult, validation: tuple[np.ndarray, np.ndarray]
) -> None:
    runtime = OnnxModel(trained_model.stored.onnx_path, device=DevicePreference.CPU)
    x, _ = validation
    together = runtime.run(x[:32])
    alone = np.concatenate([runtime.run(x[i : i + 1]) for i in range(32)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_parity_check_catches_a_graph_that_disagrees(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Normalised(DigitsCNN(), scale=16.0).eval()
    onnx_path = export.export_onnx(model, tmp_path / "m.onnx", sample_shape=(8, 8))
    x = np.random.default_rng(0).uniform(0, 16, size=(16, 8, 8)).astype(np.float32)
    assert export.check_parity(model, onnx_path, [x]) <= export.PARITY_TOLERANCE
    last = cast(nn.Linear, cast(DigitsCNN, model.network).head[-1])
    with torch.no_grad():
        last.bias.add_(0.01)  # the PyTorch model drifts from the exported one
    with pytest.raises(export.ParityError, match="differs from PyTorch"):
        export.check_parity(model, onnx_path, [x])


def test_cuda_demand_without_cuda_fails_loudly(trained_model: BuildResult) -> None:
    cpu = OnnxModel(trained_model.stored.onnx_path, device=DevicePreference.AUTO)
    if cpu.provider == "CUDAExecutionProvider":
        pytest.skip("this machine has a working CUDA provider")
    assert cpu.fallback_reason is not None
    with pytest.raises(RuntimeError, match="CUDA"):
        OnnxModel(trained_model.stored.onnx_path, device=DevicePreference.CUDA)


def test_without_a_gpu_cuda_is_not_tried_and_the_reason_is_said_once(
    trained_model: BuildResult, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from models import runtime

    if runtime.cuda_devices()[0] > 0:
        pytest.skip("this machine has a GPU")
    runtime._said.clear()
    with caplog.at_level("WARNING", logger="models.runtime"):
        first = OnnxModel(trained_model.stored.onnx_path, device=DevicePreference.AUTO)
        second = OnnxModel(trained_model.stored.onnx_path, device=DevicePreference.AUTO)
    assert first.provider == second.provider == "CPUExecutionProvider"
    assert first.fallback_reason is not None and first.fallback_reason.startswith("CUDA is not used: ")
    said = [r.getMessage() for r in caplog.records if "CUDA is not used" in r.getMessage()]
    assert said == [f"running on the CPU: {first.fallback_reason}"]  # once, not once per session
    assert "CUDAExecutionProvider" not in capfd.readouterr().err  # no banner from ONNX Runtime


def test_training_is_reproducible_from_the_seed() -> None:
    data = digits.load()
    idx = np.asarray(digits.make_split(data, seed=0).train_indices)
    config = TrainConfig(seed=5, epochs=2)

    def run(seed_config: TrainConfig) -> np.ndarray:
        model = new_digits_model(seed_config.seed)
        train(model, data.images[idx], data.labels[idx], seed_config)
        return predict_logits(model, data.images[:64])

    first, second = run(config), run(config)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, run(TrainConfig(seed=6, epochs=2)))
