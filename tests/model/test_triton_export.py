"""A stored version exported as a Triton model repository: the configuration parses as Triton's
own ModelConfig (its protobuf schema, shipped in tritonclient) and describes the ONNX graph; the
model file is the stored one; the labels are the classes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tritonclient
from click.testing import CliRunner
from google.protobuf import text_format

from models import store
from models.pipeline import BuildResult
from models.runtime import OnnxModel
from models.triton import export_repository
from service.cli import main
from tests.graphs import SHAPES, import_shapes_model

pytestmark = pytest.mark.model


def model_config() -> ModuleType:
    """Triton's model_config_pb2, loaded from its file (tritonclient's grpc package, whose
    `__init__` needs grpcio, is not imported)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tensor_model_exports_as_triton_reads_it(trained_model: BuildResult, tmp_path: Path) -> None:
    stored = trained_model.stored
    folder = export_repository(stored, tmp_path / "repository", number=3, max_batch_size=32)
    pb = model_config()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())  # unknown fields raise
    signature = stored.card.signature
    assert (config.name, config.backend, config.max_batch_size) == (stored.name, "onnxruntime", 32)
    (given,) = config.input
    assert (given.name, given.data_type, list(given.dims)) == (
        signature.input_name, pb.DataType.TYPE_FP32, list(signature.input_shape))  # fmt: skip
    (answer,) = config.output
    assert (answer.name, list(answer.dims), answer.label_filename) == (
        signature.output_name, [len(signature.class_names)], "labels.txt")  # fmt: skip
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert config.parameters["loop_version"].string_value == stored.version
    assert (folder / "3" / "model.onnx").read_bytes() == stored.onnx_path.read_bytes()
    assert (folder / "labels.txt").read_text().splitlines() == list(signature.class_names)


def test_an_image_model_exports_its_pre_processed_input(tmp_path: Path) -> None:
    stored = import_shapes_model(tmp_path, "team-shapes-triton")
    folder = export_repository(stored, tmp_path / "repository")
    pb = model_config()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    assert list(config.input[0].dims) == [3, 16, 16]  # what the service's pre-processing makes
    assert (folder / "labels.txt").read_text().splitlines() == SHAPES
    exported = OnnxModel(folder / "1" / "model.onnx")  # runs as the configuration says it does
    scores = exported.run(np.zeros((2, 3, 16, 16), np.float32))
    assert scores.shape == (2, len(SHAPES))


def test_loop_models_export_triton_writes_a_repository(trained_model: BuildResult, tmp_path: Path) -> None:
    stored = trained_model.stored
    result = CliRunner().invoke(
        main, ["models", "export-triton", stored.name, str(tmp_path), "--version", stored.version, "--number", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / stored.name / "2" / "model.onnx").exists() and (tmp_path / stored.name / "config.pbtxt").exists()
    missing = CliRunner().invoke(main, ["models", "export-triton", stored.name, str(tmp_path), "--version", "nope"])
    assert missing.exit_code == 1 and "nope" in missing.output
    assert store.exists(stored.tag)
