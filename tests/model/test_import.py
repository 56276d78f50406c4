"""Importing a team's ONNX classifier: the graph checked against its spec, run once, stored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from models import store
from models.importer import ImportRefused, import_model
from models.runtime import OnnxModel
from models.spec import ModelSpec, parse
from tests.graphs import linear_classifier

pytestmark = pytest.mark.model

CLASSES = ["circle", "square", "triangle"]
SPEC: dict[str, Any] = {
    "input": {"kind": "image", "width": 8, "height": 6, "mode": "RGB", "mean": [0.5], "std": [0.25]},
    "classes": CLASSES,
    "onnx_input": "image",
    "onnx_output": "logits",
}


def test_a_good_classifier_is_stored_with_its_spec_and_runs(tmp_path: Path) -> None:
    spec = parse(SPEC)
    stored = import_model("team-shapes", linear_classifier(tmp_path / "m.onnx"), spec)
    again = store.get(stored.tag)
    assert again.card.model_spec == spec
    assert again.card.signature == spec.signature()
    assert again.card.opset == 17 and again.card.extra["sha256"]
    scores = OnnxModel(again.onnx_path).run(np.zeros((5, 3, 6, 8), np.float32))
    assert scores.shape == (5, 3)
    assert stored.tag in [m.tag for m in store.list_models("team-shapes")]


@pytest.mark.parametrize(
    ("graph", "fragment"),
    [
        ({"input_name": "pixels"}, "onnx_input: the spec says 'image', the graph's inputs are ['pixels']"),
        ({"output_name": "probs"}, "onnx_output: the spec says 'logits', the graph's outputs are ['probs']"),
        ({"input_dims": [1, 3, 6, 8]}, "batch axis: the graph's 'image' has a fixed batch of 1"),
        ({"input_dims": ["batch", 144]}, "input rank: the spec says 4 (a batch of [3, 6, 8])"),
        ({"input_dims": ["batch", 3, 8, 6]}, "input shape: the spec's input makes samples of [3, 6, 8]"),
        ({"output_dims": ["batch", 4], "classes": 4}, "classes: the spec names 3, the graph's 'logits' answers 4"),
        ({"output_dims": ["batch", "n"], "classes": 4}, "but a batch of 2 gave scores of shape [2, 4]"),
        ({"output_dims": ["batch", 3, 1]}, "output rank: a classifier answers (batch, classes)"),
        ({"elem_type": TensorProto.INT64}, "input dtype: the spec's input is float32, the graph's 'image' is INT64"),
        ({"extra_input": True}, "the graph has 2 inputs (['image', 'mask'])"),
    ],
)  # fmt: skip
def test_a_mismatch_is_refused_naming_the_field_and_both_values(
    tmp_path: Path, graph: dict[str, Any], fragment: str
) -> None:
    before = len(store.list_models("team-refused"))
    with pytest.raises(ImportRefused) as info:
        import_model("team-refused", linear_classifier(tmp_path / "m.onnx", **graph), parse(SPEC))
    assert fragment in str(info.value)
    assert len(store.list_models("team-refused")) == before  # nothing stored


def test_a_file_that_is_no_onnx_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01not protobuf at all")
    with pytest.raises(ImportRefused, match="is not"):
        import_model("team-refused", tmp_path / "junk.onnx", parse(SPEC))
    with pytest.raises(ImportRefused, match="no such file"):
        import_model("team-refused", tmp_path / "missing.onnx", parse(SPEC))


def test_a_tensor_classifier_imports_too(tmp_path: Path) -> None:
    spec = ModelSpec.model_validate({"input": {"kind": "tensor", "shape": [4], "min_value": -1, "max_value": 1},
                                     "classes": ["no", "yes"]})  # fmt: skip
    path = linear_classifier(tmp_path / "t.onnx", input_name="input", input_dims=["n", 4], classes=2, features=4)
    assert import_model("team-tensor", path, spec).card.signature.input_shape == (4,)


def loop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120, check=False)  # fmt: skip


def test_the_import_and_list_commands(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(
        "input: {kind: image, width: 8, height: 6, mean: [0.5], std: [0.25]}\n"
        "classes: [circle, square, triangle]\nonnx_input: image\n"
    )
    good = loop("models", "import", "team-cli", "--onnx", str(linear_classifier(tmp_path / "m.onnx")),
                "--spec", str(tmp_path / "spec.yaml"))  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "imported team-cli:" in good.stdout and "image input [3, 6, 8], 3 classes" in good.stdout
    bad = loop("models", "import", "team-cli", "--onnx", str(linear_classifier(tmp_path / "b.onnx", classes=5)),
               "--spec", str(tmp_path / "spec.yaml"))  # fmt: skip
    assert bad.returncode == 1 and "classes: the spec names 3, the graph's 'logits' answers 5" in bad.stderr
    (tmp_path / "bad.yaml").write_text("classes: [a]\n")
    invalid = loop(
        "models", "import", "team-cli", "--onnx", str(tmp_path / "m.onnx"), "--spec", str(tmp_path / "bad.yaml")
    )
    assert invalid.returncode == 1 and "input: Field required" in invalid.stderr
    listed = loop("models", "list", "team-cli")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1
    assert "image 3x6x8\t3 classes" in listed.stdout


def test_an_output_kind_the_probe_batch_contradicts_is_refused_saying_which_to_write(tmp_path: Path) -> None:
    ends_in_softmax = linear_classifier(tmp_path / "p.onnx", softmax=True)
    with pytest.raises(ImportRefused, match="rows on a probe batch are non-negative and each sums to 1") as refused:
        import_model("team-probs", ends_in_softmax, parse(SPEC))
    assert "write `output_kind: probabilities`" in str(refused.value)
    logits = linear_classifier(tmp_path / "l.onnx")
    with pytest.raises(ImportRefused, match="write `output_kind: logits`"):
        import_model("team-probs", logits, parse({**SPEC, "output_kind": "probabilities"}))
    assert store.list_models("team-probs") == []


def test_a_model_that_answers_probabilities_is_scored_as_it_answers(tmp_path: Path) -> None:
    """Scores are the graph's probabilities, not softmax of them: confident rows stay confident."""
    from models.signature import postprocess

    path = linear_classifier(tmp_path / "p.onnx", softmax=True, weight_scale=20.0)
    stored = import_model("team-probs", path, parse({**SPEC, "output_kind": "probabilities"}))
    assert store.get(stored.tag).card.model_spec.output_kind == "probabilities"
    batch = np.random.default_rng(1).uniform(-2, 2, size=(16, 3, 6, 8)).astype(np.float32)
    raw = OnnxModel(stored.onnx_path).run(batch)
    answered = postprocess(raw, stored.card.model_spec.output_kind)
    np.testing.assert_allclose(answered.probabilities, raw, atol=1e-7)
    assert float(answered.confidences.max()) > 0.99  # softmax applied again would keep every one below 0.58
