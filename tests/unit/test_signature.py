from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest

from models.npy import read_npy
from models.signature import InputError, Signature, postprocess, softmax, to_batch

pytestmark = pytest.mark.unit

SIG = Signature(input_shape=(8, 8), class_names=tuple("0123456789"), min_value=0.0, max_value=16.0)


def grid(value: Any = 1.0) -> list[list[Any]]:
    return [[value] * 8 for _ in range(8)]


def test_valid_samples_become_one_float32_batch() -> None:
    batch = to_batch([grid(0), grid(16.0), grid(3)], SIG, max_samples=10)
    assert batch.shape == (3, 8, 8)
    assert batch.dtype == np.float32
    assert batch.flags.c_contiguous
    assert batch[1, 0, 0] == 16.0


@pytest.mark.parametrize(
    ("samples", "fragment"),
    [
        ([], "empty"),
        ([grid()] * 5, "too many samples: 5 > the limit of 4"),
        ([[[1.0] * 8] * 7], "shape [8, 8], got [7, 8]"),
        ([grid(), [[1.0] * 8] * 7], "samples[1] has shape [7, 8]"),
        ([[[1.0] * 8] * 7 + [[1.0] * 3]], "ragged"),
        ([grid("3")], "only numbers (found text)"),
        ([grid(True)], "only numbers (found true/false)"),
        ([grid(None)], "only numbers (found null"),
        ([grid(), grid(math.nan)], "samples[1] contains a non-finite value"),
        ([grid(math.inf)], "non-finite"),
        ([grid(), grid(), grid(16.5)], "samples[2] has value 16.5 outside the range [0, 16]"),
        ([grid(-1)], "value -1 outside"),
        ([1.0, 2.0], "shape [8, 8], got []"),
    ],
)
def test_bad_samples_are_refused_with_a_reason(samples: list[Any], fragment: str) -> None:
    with pytest.raises(InputError) as info:
        to_batch(samples, SIG, max_samples=4)
    assert fragment in str(info.value)


def test_softmax_is_stable_and_normalised() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1], 1 / 3, rtol=1e-6)


def test_postprocess_labels_are_argmax_and_confidence_is_their_probability() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)).astype(np.float32)
    out = postprocess(logits)
    np.testing.assert_array_equal(out.labels, logits.argmax(axis=1))
    np.testing.assert_allclose(out.confidences, out.probabilities.max(axis=1))
    assert out.probabilities.shape == (50, 10)


def test_signature_round_trips_through_metadata() -> None:
    assert Signature.from_dict(SIG.to_dict()) == SIG


def with_value_at(value: Any, row: int = 3, col: int = 4) -> list[list[Any]]:
    sample = grid(1)
    sample[row][col] = value
    return sample


@pytest.mark.parametrize(
    ("samples", "fragment"),
    [
        # numpy would turn these into 1.0 / 0 without a word
        ([with_value_at(True)], "samples[0] contains true/false"),
        ([grid(), grid(), with_value_at(False)], "samples[2] contains true/false"),
        # checked as sent, before the float32 cast rounds them into or out of the range
        ([with_value_at(16.00000001)], "samples[0] has value 16.00000001 outside the range [0, 16]"),
        ([with_value_at(1e308)], "samples[0] has value 1e+308 outside the range"),
        ([with_value_at(-1e-30)], "value -1e-30 outside the range"),
        ([with_value_at(10**30)], "samples[0] has value 1e+30 outside the range"),
        ([with_value_at(10**400)], "an integer too large"),
    ],
)
def test_values_are_checked_as_sent(samples: list[Any], fragment: str) -> None:
    with pytest.raises(InputError) as info:
        to_batch(samples, SIG, max_samples=4)
    assert fragment in str(info.value)


def test_the_range_bounds_themselves_are_accepted() -> None:
    batch = to_batch([with_value_at(16), with_value_at(0.0), with_value_at(15.999999)], SIG, max_samples=4)
    assert batch.dtype == np.float32 and batch.max() <= 16


def npy_file(array: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_read_npy_gives_back_the_array() -> None:
    array = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    np.testing.assert_array_equal(read_npy(npy_file(array)), array)
    fortran = np.asfortranarray(array.astype(">f8"))
    np.testing.assert_array_equal(read_npy(npy_file(fortran)), array)


def _huge_header() -> bytes:
    body = npy_file(np.zeros((1, 8, 8), np.float32))
    return body.replace(b"(1, 8, 8), }", b"(100000000, 8, 8), }")[:256]


def _zipped() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros((1, 8, 8)))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (npy_file(np.float32(3)), "0-d"),
        (_zipped(), "zip archive"),
        (_huge_header(), "declares shape [100000000, 8, 8] (25600000000 bytes) but"),
        (npy_file(np.zeros((1, 8, 8)))[:-1], "but 511 bytes follow"),
        (npy_file(np.zeros((1, 8, 8))) + b"x", "but 513 bytes follow"),
        (b"\x93NUMPY\x03\x00" + b"\x00" * 20, "version 3.0 is not supported"),
        (b"not npy", "not an .npy array"),
        (b"", "not an .npy array"),
    ],
)
def test_read_npy_refuses_what_is_not_one_array(body: bytes, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        read_npy(body)
    assert fragment in str(info.value)
