"""The one .npy codec: what it writes is what `np.save` writes, and each reader takes what it should."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from models.npy import NpyDecoder, NpyError, npy_bytes, read_header, read_npy
from models.signature import InputError

pytestmark = pytest.mark.unit


def saved(array: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(array), **kwargs)
    return buffer.getvalue()


def test_what_it_writes_numpy_reads_and_it_reads_back() -> None:
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    assert npy_bytes(array) == saved(array)
    np.testing.assert_array_equal(read_npy(npy_bytes(array)), array)


def test_the_stored_form_is_version_1_c_order_numbers() -> None:
    plain = np.zeros((2, 2), np.float32)
    assert read_header(npy_bytes(plain)).plain
    assert not read_header(saved(plain, version=(2, 0))).plain
    assert not read_header(saved(np.asfortranarray(np.ones((2, 3))))).plain
    assert not read_header(saved(np.array([True, False]))).plain


def test_an_npy_error_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"not an \.npy array"):
        read_npy(b"nonsense")
    assert issubclass(NpyError, ValueError)


def test_the_decoder_takes_its_shape_and_nothing_else() -> None:
    decoder = NpyDecoder((2, 2))
    fast = decoder.decode(npy_bytes(np.full((2, 2), 0.5, np.float32)))
    assert fast is not None and fast.dtype == np.float32 and float(fast.sum()) == 2.0
    other = decoder.decode(saved(np.asfortranarray(np.eye(2))))  # float64, Fortran order: converted
    assert other is not None and other.dtype == np.float32
    np.testing.assert_array_equal(other, np.eye(2))
    assert decoder.decode(npy_bytes(np.zeros((3, 2), np.float32))) is None
    assert decoder.decode(npy_bytes(np.array([["a", "b"], ["c", "d"]]))) is None
    assert decoder.decode(npy_bytes(np.zeros((2, 2), np.float32))[:-1]) is None
    assert decoder.decode(b"") is None
