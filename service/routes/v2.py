"""The Open Inference Protocol (KServe v2, REST) as pure functions: parse a request, shape an answer.

Requests carry `inputs` (name, shape, datatype, row-major `data`), optional `outputs`, `id` and
`parameters`; with the binary tensor data extension, the JSON header is the first
`Inference-Header-Content-Length` bytes of the body and each input with a `binary_data_size`
parameter has its bytes after it, in order (BYTES elements as a 4-byte little-endian length and
the bytes). A request that does not add up is a `ProtocolError` (a `Malformed` request: 400).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from feedback.errors import Malformed

NUMERIC: dict[str, str] = {
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
DATATYPES = (*NUMERIC, "BOOL", "BYTES")
SCORES, LABEL = "probabilities", "label"  # the outputs every classifier answers with
OUTPUTS = (SCORES, LABEL)


class ProtocolError(Malformed):
    """A request the protocol refuses (answered 400)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: NDArray[Any] | list[bytes]  # numbers as an array of `shape`; BYTES as a flat list
    binary: bool = False  # sent in the binary section (else as JSON data)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: dict[str, bool] = field(default_factory=dict)  # asked-for output -> as binary
    binary_output: bool = False  # the request's default for outputs not named

    def wants(self, name: str) -> bool:
        return not self.outputs or name in self.outputs

    def binary(self, name: str) -> bool:
        return self.outputs.get(name, self.binary_output)


def parse(body: bytes, header_length: str | None, *, known: Sequence[str] = OUTPUTS) -> InferRequest:
    """An inference request from its body (and the binary extension's header), or `ProtocolError`;
    `known`: the outputs it may ask for."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length is not a number: {header_length!r}") from None
        if not 0 < length <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes")
    else:
        length = len(body)
    try:
        header = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the inference request is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the inference request must be a JSON object")
    binary = memoryview(body)[length:]
    inputs_raw = header.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise ProtocolError("'inputs' must be a non-empty list")
    offset = 0
    inputs = []
    for raw in inputs_raw:
        tensor, used = _tensor(raw, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise ProtocolError(
            f"the body has {len(binary)} bytes of binary data, but the inputs' binary_data_size add up to {offset}"
        )
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_outputs(header.get("outputs"), known),
        binary_output=bool(parameters.get("binary_data_output", False)),
    )


def _outputs(raw: Any, known: Sequence[str]) -> dict[str, bool]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ProtocolError("'outputs' must be a list")
    wanted: dict[str, bool] = {}
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in known:
            raise ProtocolError(f"unknown output {name!r}: the outputs are {', '.join(known)}")
        parameters = item.get("parameters") or {}
        wanted[name] = bool(parameters.get("binary_data", False)) if isinstance(parameters, dict) else False
    return wanted


def _tensor(raw: Any, binary: memoryview) -> tuple[Tensor, int]:
    """One input, and how many bytes of the binary section it took."""
    if not isinstance(raw, dict):
        raise ProtocolError("each input must be an object with name, shape, datatype and data")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError("an input has no name")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of sizes, got {shape!r}")
    count = math.prod(shape)
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} is more than the {len(binary)} bytes left")
        chunk = bytes(binary[:size])
        return Tensor(name, datatype, tuple(shape), _from_binary(name, datatype, shape, count, chunk), True), size
    if "data" not in raw:
        raise ProtocolError(f"input {name!r} has neither data nor binary_data_size")
    return Tensor(name, datatype, tuple(shape), _from_json(name, datatype, shape, count, raw["data"])), 0


def _from_binary(name: str, datatype: str, shape: list[int], count: int, chunk: bytes) -> NDArray[Any] | list[bytes]:
    if datatype == "BYTES":
        elements, at = [], 0
        while at < len(chunk):
            if at + 4 > len(chunk):
                raise ProtocolError(f"input {name!r}: a BYTES element's length is cut off")
            (n,) = struct.unpack_from("<I", chunk, at)
            if at + 4 + n > len(chunk):
                raise ProtocolError(f"input {name!r}: a BYTES element says {n} bytes, fewer follow")
            elements.append(chunk[at + 4 : at + 4 + n])
            at += 4 + n
        if len(elements) != count:
            raise ProtocolError(f"input {name!r}: shape {shape} holds {count} elements, the data has {len(elements)}")
        return elements
    dtype = np.dtype(NUMERIC.get(datatype, "?"))
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: shape {shape} of {datatype} is {count * dtype.itemsize} bytes, binary_data_size says "
            f"{len(chunk)}"
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _from_json(name: str, datatype: str, shape: list[int], count: int, data: Any) -> NDArray[Any] | list[bytes]:
    flat = list(_flatten(data))
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: shape {shape} holds {count} elements, the data has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be strings")
        return [v.encode() for v in flat]
    numbers = (bool,) if datatype == "BOOL" else (int, float)
    if not all(type(v) in numbers for v in flat):
        raise ProtocolError(
            f"input {name!r}: {datatype} data must be {'true/false' if datatype == 'BOOL' else 'numbers'}"
        )
    try:
        return np.asarray(flat, dtype=np.float64 if datatype != "BOOL" else np.bool_).reshape(shape)
    except OverflowError:
        raise ProtocolError(f"input {name!r}: a value does not fit {datatype}") from None


def _flatten(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


Output = tuple[str, list[int], Any, bytes]  # datatype, shape, as JSON data, as binary data


def response(
    request: InferRequest,
    *,
    model_name: str,
    model_version: str,
    probabilities: NDArray[np.float32],
    labels: Sequence[str],
    prediction_ids: Sequence[str],
) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON header's length when binary outputs follow it."""
    values: dict[str, Output] = {
        SCORES: ("FP32", list(probabilities.shape), probabilities.tolist(), probabilities.astype("<f4").tobytes()),
        LABEL: (
            "BYTES",
            [len(labels)],
            list(labels),
            b"".join(struct.pack("<I", len(b)) + b for b in (label.encode() for label in labels)),
        ),
    }
    header = {"model_name": model_name, "model_version": model_version}
    return encode(request, {**header, "parameters": {"prediction_ids": ",".join(prediction_ids)}}, values)


def encode(request: InferRequest, header: dict[str, Any], values: dict[str, Output]) -> tuple[bytes, int | None]:
    """An answer of `values`' outputs that the request asks for (in `values`' order), each as JSON
    data or binary as it asked, after `header`: the body and the JSON header's length when binary
    data follows it."""
    outputs, tails = [], []
    for name, (datatype, shape, as_json, as_binary) in values.items():
        if not request.wants(name):
            continue
        if request.binary(name):
            outputs.append(
                {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(as_binary)}}
            )
            tails.append(as_binary)
        else:
            outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": as_json})
    header = {**header, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if not tails:
        return encoded, None
    return encoded + b"".join(tails), len(encoded)
