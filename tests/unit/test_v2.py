"""The Open Inference Protocol's request parsing and answers, without a server."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from service.problems import status_of
from service.routes import v2

pytestmark = pytest.mark.unit


def binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, str]:
    encoded = json.dumps(header).encode()
    return encoded + b"".join(chunks), str(len(encoded))


def test_json_and_binary_inputs_parse_to_the_same_tensor() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    as_json = v2.parse(json.dumps({"id": "a", "inputs": [
        {"name": "x", "shape": [3, 4], "datatype": "FP32", "data": array.tolist()}]}).encode(), None)  # fmt: skip
    body, length = binary_body(
        {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "parameters": {"binary_data_size": 48}}],
         "parameters": {"binary_data_output": True}}, array.tobytes())  # fmt: skip
    as_binary = v2.parse(body, length)
    np.testing.assert_array_equal(as_json.inputs[0].values, as_binary.inputs[0].values)
    assert as_json.id == "a" and not as_json.inputs[0].binary and as_binary.inputs[0].binary
    assert as_binary.binary("label") and not as_json.binary("label")


def test_bytes_elements_are_length_prefixed_in_binary() -> None:
    elements = [b"\x89PNG one", b"", b"two"]
    chunk = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    body, length = binary_body({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                            "parameters": {"binary_data_size": len(chunk)}}]}, chunk)  # fmt: skip
    assert v2.parse(body, length).inputs[0].values == elements


@pytest.mark.parametrize(
    ("header", "data", "fragment"),
    [
        ({"inputs": []}, b"", "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}, b"", "unknown datatype"),
        ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, b"", "shape must be a list"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}, b"", "holds 3 elements"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]}, b"", "must be numbers"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}, b"", "neither data nor binary_data_size"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": "size=8"}]}, b"",
         "'parameters' must be an object"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
         b"\x00" * 4, "binary_data_size 8 is more than the 4 bytes left"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
         b"\x00" * 8, "is 12 bytes, binary_data_size says 8"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
         b"\x00" * 6, "6 bytes of binary data, but the inputs' binary_data_size add up to 4"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]},
         struct.pack("<I", 9) + b"ab", "says 9 bytes, fewer follow"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "z"}]},
         b"", "unknown output 'z'"),
    ],
)  # fmt: skip
def test_requests_that_do_not_add_up_are_refused_with_the_reason(
    header: dict[str, Any], data: bytes, fragment: str
) -> None:
    body, length = binary_body(header, data)
    with pytest.raises(v2.ProtocolError) as info:
        v2.parse(body, length if data or "binary_data_size" in json.dumps(header) else None)
    assert fragment in str(info.value) and status_of(info.value) == 400  # the table's status


def test_a_header_length_that_does_not_fit_is_refused() -> None:
    for length in ("abc", "0", "10000"):
        with pytest.raises(v2.ProtocolError, match="Inference-Header-Content-Length"):
            v2.parse(b'{"inputs": []}', length)


def test_answers_carry_what_was_asked_as_json_or_binary() -> None:
    probabilities = np.asarray([[0.25, 0.75], [0.5, 0.5]], np.float32)
    request = v2.InferRequest(id="r1", inputs=[], outputs={"label": True})
    body, length = v2.response(request, model_name="m", model_version="v", probabilities=probabilities,
                               labels=["yes", "no"], prediction_ids=["i1", "i2"])  # fmt: skip
    assert length is not None
    header = json.loads(body[:length])
    assert header["id"] == "r1" and header["parameters"] == {"prediction_ids": "i1,i2"}
    (label,) = header["outputs"]
    assert label["parameters"]["binary_data_size"] == len(body) - length
    assert body[length:] == struct.pack("<I", 3) + b"yes" + struct.pack("<I", 2) + b"no"
    plain = v2.InferRequest(id=None, inputs=[])
    everything, none = v2.response(plain, model_name="m", model_version="v", probabilities=probabilities,
                                   labels=["yes", "no"], prediction_ids=["a", "b"])  # fmt: skip
    assert none is None
    outputs = {o["name"]: o for o in json.loads(everything)["outputs"]}
    assert outputs["probabilities"]["data"] == probabilities.tolist() and outputs["label"]["data"] == ["yes", "no"]
