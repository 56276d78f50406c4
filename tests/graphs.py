"""ONNX classifiers built in a few lines, for tests that need a team's model of any shape, and images
to send them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from models.importer import import_model
from models.spec import ModelSpec
from models.store import StoredModel


def linear_classifier(
    path: Path,
    *,
    input_name: str = "image",
    input_dims: list[int | str] | None = None,
    output_name: str = "logits",
    output_dims: list[int | str] | None = None,
    classes: int = 3,
    features: int = 3 * 6 * 8,
    elem_type: int = TensorProto.FLOAT,
    extra_input: bool = False,
    softmax: bool = False,
    last_op: str | None = None,
    weight_scale: float = 1.0,
) -> Path:
    """Flatten -> MatMul -> Add: a classifier of any shape, with seeded weights; `softmax` ends it
    in a Softmax (it answers probabilities, as many exported classifiers do); `last_op` appends a
    one-input operator of that name (e.g. one a converter does not know)."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array((weight_scale * rng.normal(size=(features, classes))).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    nodes = [
        helper.make_node("Cast", [input_name], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["scores"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probabilities"], axis=-1))
    if last_op is not None:
        nodes.append(helper.make_node(last_op, [nodes[-1].output[0]], ["last"]))
    nodes.append(helper.make_node("Identity", [nodes[-1].output[0]], [output_name]))
    inputs = [helper.make_tensor_value_info(input_name, elem_type, input_dims or ["batch", 3, 6, 8])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1]))
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_dims or ["batch", classes])]
    graph = helper.make_graph(nodes, "classifier", inputs, outputs, initializer=[weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


SHAPES = ["circle", "square", "triangle"]


def import_shapes_model(folder: Path, name: str) -> StoredModel:
    """A team's image classifier of three shapes (16 by 16 RGB, seeded weights), imported as `name`."""
    spec = ModelSpec.model_validate({
        "input": {"kind": "image", "width": 16, "height": 16, "mean": [0.5], "std": [0.25]},
        "classes": SHAPES, "onnx_input": "image",
    })  # fmt: skip
    path = linear_classifier(folder / "shapes.onnx", input_dims=["batch", 3, 16, 16], features=3 * 16 * 16)
    return import_model(name, path, spec)


def random_png(seed: int, size: tuple[int, int] = (20, 20)) -> bytes:
    """A PNG of seeded random RGB pixels, `size` (height, width)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()
