"""The shared inference process's pure parts: frames, GPU pins, socket names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.inference import ProtocolError, _array, gpu_pins
from service.settings import Settings


def test_a_payload_becomes_the_array_its_header_describes() -> None:
    sent = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    got = _array({"dtype": "float32", "shape": [2, 2, 3]}, sent.tobytes())
    np.testing.assert_array_equal(got, sent)


@pytest.mark.parametrize(
    ("header", "payload", "says"),
    [
        ({"dtype": "float64", "shape": [1]}, b"\0" * 8, "dtype must be one of"),
        ({"dtype": "float32", "shape": "3"}, b"\0" * 12, "shape must be a list"),
        ({"dtype": "float32", "shape": [-1]}, b"", "shape must be a list"),
        ({"dtype": "float32", "shape": [True]}, b"\0" * 4, "shape must be a list"),
        ({"dtype": "float32", "shape": [2, 2]}, b"\0" * 12, "is not 12 bytes"),
    ],
)
def test_a_header_that_does_not_match_its_payload_is_refused(
    header: dict[str, object], payload: bytes, says: str
) -> None:
    with pytest.raises(ProtocolError, match=says):
        _array(header, payload)


@pytest.mark.parametrize(
    ("processes", "gpus", "visible", "pins"),
    [
        (None, 0, None, [None]),  # no GPU: one process, unpinned
        (3, 0, None, [None, None, None]),
        (None, 2, None, ["0", "1"]),  # one process per GPU
        (None, 2, "4,6", ["4", "6"]),  # the GPUs the user made visible, by their ids
        (3, 2, "4, 6", ["4", "6", "4"]),  # more processes than GPUs: round robin
        (1, 4, None, ["0"]),
        (None, 0, "", [None]),
    ],
)
def test_one_inference_process_per_gpu(
    processes: int | None, gpus: int, visible: str | None, pins: list[str | None]
) -> None:
    assert gpu_pins(processes, gpus, visible) == pins


def test_each_inference_process_has_a_socket_of_its_own(tmp_path: Path) -> None:
    settings = Settings(inference="shared", port=4100, inference_socket=tmp_path / "inf.sock")
    assert settings.shared_inference
    assert [settings.inference_socket_for(i).name for i in range(3)] == ["inf.sock", "inf-1.sock", "inf-2.sock"]
    assert Settings(port=4100).inference_socket_for(0).name == "loop-inference-4100.sock"
    assert not Settings().shared_inference
