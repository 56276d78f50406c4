"""A stored model version as a Triton Inference Server model repository: `<name>/config.pbtxt` for
the ONNX Runtime backend with dynamic batching, `<name>/<n>/model.onnx` (the very file the store
holds) and `<name>/labels.txt` (the class names, for Triton's classification extension).

The configuration describes the ONNX graph as Triton runs it: its input and output by name, type
and dimensions read from the graph itself (the batch axis left out, as `max_batch_size` implies).
An image model's graph takes the pre-processed tensor, so a client of such a repository sends what
the service's pre-processing makes, not the encoded image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from models.store import StoredModel

# ONNX element types as Triton names them (https://github.com/triton-inference-server/server, model_config.proto).
TRITON_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


Tensor = tuple[str, str, list[int]]  # name, Triton type, dims without the batch axis


def _tensor(value: onnx.ValueInfoProto) -> Tensor:
    """(name, Triton type, dims without the batch axis) of a graph input or output."""
    kind = value.type.tensor_type
    if kind.elem_type not in TRITON_TYPES:
        raise ValueError(f"{value.name}: ONNX element type {kind.elem_type} has no Triton type here")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    if not dims or dims[0] not in (-1, 0):
        raise ValueError(f"{value.name}: the first axis must be the (dynamic) batch axis, got {dims}")
    return value.name, TRITON_TYPES[kind.elem_type], dims[1:]


def graph_io(path: Path) -> tuple[Tensor, Tensor]:
    """The input and the output of a classifier's ONNX graph, as Triton declares them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [_tensor(v) for v in graph.input if v.name not in initializers]
    outputs = [_tensor(v) for v in graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        found = f"{len(inputs)} inputs and {len(outputs)} outputs"
        raise ValueError(f"{path}: a classifier with one input and one output exports; this has {found}")
    return inputs[0], outputs[0]


def config_text(stored: StoredModel, *, max_batch_size: int, max_queue_delay_us: int) -> str:
    """The model's `config.pbtxt` (protobuf text format of Triton's ModelConfig). Every version in
    the folder is served (`version_policy: all`): the service names the one it serves in each call."""
    try:
        (in_name, in_type, in_dims), (out_name, out_type, out_dims) = graph_io(stored.onnx_path)
    except ValueError as exc:
        raise ValueError(f"{stored.tag}: {exc}") from None
    return "\n".join(
        [
            f'name: "{stored.name}"',
            'backend: "onnxruntime"',
            f"max_batch_size: {max_batch_size}",
            "version_policy: { all { } }",
            f'input [ {{ name: "{in_name}" data_type: {in_type} dims: {_dims(in_dims)} }} ]',
            f'output [ {{ name: "{out_name}" data_type: {out_type} dims: {_dims(out_dims)}'
            ' label_filename: "labels.txt" } ]',
            f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
            "instance_group [ { kind: KIND_AUTO count: 1 } ]",
            f'parameters {{ key: "loop_version" value {{ string_value: "{stored.version}" }} }}',
            "",
        ]
    )


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def export_repository(
    stored: StoredModel, root: Path, *, number: int = 1, max_batch_size: int = 64, max_queue_delay_us: int = 1000
) -> Path:
    """Write (or add version `number` to) `root/<name>/`: the model's folder in a Triton repository."""
    folder = root / stored.name
    (folder / str(number)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stored.onnx_path, folder / str(number) / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(stored.card.signature.class_names) + "\n")
    (folder / "config.pbtxt").write_text(
        config_text(stored, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us)
    )
    return folder
