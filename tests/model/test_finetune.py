"""Fine-tuning a team's own ONNX graph: converted, trained, its weights written back into the same graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from models import finetune
from models.export import check_parity
from models.runtime import OnnxModel
from models.signature import to_probabilities
from models.spec import parse
from models.train import TrainConfig
from models.trainers import FINE_TUNE, Examples, TrainRequest, check_before_training, fine_tune, load_trainer
from tests.graphs import linear_classifier

pytestmark = pytest.mark.model

SPEC: dict[str, Any] = {
    "input": {"kind": "tensor", "shape": [3, 6, 8], "min_value": -4, "max_value": 4},
    "classes": ["a", "b", "c"],
    "onnx_input": "image",
    "onnx_output": "logits",
    "output_kind": "probabilities",
}


def blobs(seed: int, per_class: int = 40) -> Examples:
    """Three well separated classes: the seeded linear graph gets about a third of them right."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(3, 3, 6, 8)).astype(np.float32)
    labels = np.repeat(np.arange(3), per_class)
    inputs = centres[labels] + 0.3 * rng.normal(size=(len(labels), 3, 6, 8)).astype(np.float32)
    return Examples(inputs.astype(np.float32), labels.astype(np.int64))


def accuracy(graph: Path, data: Examples) -> float:
    scores = to_probabilities(OnnxModel(graph).run(data.inputs), "probabilities")
    return float((scores.argmax(1) == data.labels).mean())


def test_the_graph_itself_is_fine_tuned_and_keeps_its_operators(tmp_path: Path) -> None:
    base = linear_classifier(tmp_path / "team.onnx", softmax=True, weight_scale=0.1)
    spec = parse({**SPEC, "trainer": FINE_TUNE})
    train, validation = blobs(0), blobs(1)
    before = accuracy(base, validation)
    config = TrainConfig(epochs=20, batch_size=8)
    request = TrainRequest(spec=spec, train=train, validation=validation, config=config, base=base)
    trained = load_trainer(FINE_TUNE)(request)
    assert trained.graph is not None and len(trained.history.epochs) == 20
    tuned = tmp_path / "tuned.onnx"
    tuned.write_bytes(trained.graph)
    assert check_parity(trained.module, tuned, [validation.inputs, validation.inputs[:1]]) < 1e-4
    after = accuracy(tuned, validation)
    assert after > before + 0.3, (before, after)
    original, kept = onnx.load(str(base)), onnx.load(str(tuned))
    assert [n.op_type for n in kept.graph.node] == [n.op_type for n in original.graph.node]  # Softmax included
    assert [i.name for i in kept.graph.input] == ["image"] and [o.name for o in kept.graph.output] == ["logits"]
    rows = OnnxModel(tuned).run(validation.inputs)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-5)  # it still answers probabilities


def test_weights_kept_in_constant_nodes_are_found(tmp_path: Path) -> None:
    """Older exporters keep every weight in a Constant node; they are trained all the same."""
    model = onnx.load(str(linear_classifier(tmp_path / "team.onnx", softmax=True)))
    constants = [onnx.helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    nodes = list(model.graph.node)
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.node.extend([*constants, *nodes])
    onnx.save(model, str(tmp_path / "constants.onnx"))
    converted = finetune.convert(tmp_path / "constants.onnx")
    assert sorted(converted.weights.values()) == ["b", "w"]


def test_a_graph_the_converter_cannot_convert_is_refused_before_training_naming_the_operator(tmp_path: Path) -> None:
    graph = linear_classifier(tmp_path / "shrink.onnx", last_op="Shrink")
    with pytest.raises(finetune.Unconvertible, match=r"no converter for Shrink \(opset 17\)"):
        check_before_training(FINE_TUNE, graph)
    with pytest.raises(finetune.Unconvertible, match="none is stored"):
        check_before_training(FINE_TUNE, None)
    check_before_training("models.trainers:image_cnn", None)  # other trainers need no graph
    request = TrainRequest(spec=parse(SPEC), train=blobs(0, 5), validation=blobs(1, 5), config=TrainConfig(epochs=1))
    with pytest.raises(finetune.Unconvertible, match=r"TrainRequest\.base"):
        fine_tune(request)
