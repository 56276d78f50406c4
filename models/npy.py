"""The one .npy codec: arrays to `.npy` bytes and back, for request bodies, the prediction log and
dataset versions alike.

The bytes come from clients and from Redis, so reading checks the header against the payload
before anything is allocated, refuses what only a pickle could carry, and names the first thing
wrong. The same few shapes and dtypes recur, so a header is parsed once per distinct header, not
once per array, and `NpyDecoder` reads the header `npy_bytes` writes with a slice.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Any, NamedTuple, NoReturn

import numpy as np
from numpy.typing import NDArray

from models.signature import InputError

MAGIC = b"\x93NUMPY"
MAX_HEADER_SIZE = 1024  # bytes of header text: far more than a shape of eight dimensions needs
_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_WIDTH = {1: 2, 2: 4}  # bytes that hold the header's length, by major version
_VERSIONS = (b"\x01\x00", b"\x02\x00")


class NpyError(InputError):
    """Bytes that are not one `.npy` array of numbers; the message says why."""


class Header(NamedTuple):
    """What a `.npy` header declares: the array, where its payload starts, and where it ends."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    version: tuple[int, int]
    offset: int  # the payload's first byte
    size: int  # the whole file's length: header and payload
    plain: bool  # version 1.0, C order, numbers: what `npy_bytes` writes of an array of numbers


@lru_cache(maxsize=64)
def _header_bytes(shape: tuple[int, ...], dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npy_bytes(array: NDArray[Any]) -> bytes:
    """The .npy file bytes of `array` (C order), as `np.save` writes them, without going through it per call."""
    array = np.ascontiguousarray(array)
    return _header_bytes(tuple(array.shape), array.dtype.str) + array.tobytes()


def read_header(data: bytes) -> Header:
    """The header of one `.npy` file's bytes, checked against the length of its payload, or
    `NpyError` saying why the bytes are not one array of numbers."""
    # The header's length is in bytes 8-9 (version 1.0) or 8-11 (2.0); the header bytes are the
    # cache's key, so the common case costs a slice and a look-up.
    if data[:6] == MAGIC and data[6:8] in _VERSIONS:
        width = 2 if data[6] == 1 else 4
        header = _parse(data[: 8 + width + int.from_bytes(data[8 : 8 + width], "little")])
        if type(header) is Header and header.size == len(data):
            return header
    _refuse(data)


def _refuse(data: bytes) -> NoReturn:
    """`NpyError` naming the first thing wrong with bytes `read_header` did not take."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        raise NpyError("the body is a zip archive (.npz?): send one .npy array")
    try:
        version = np.lib.format.read_magic(io.BytesIO(data))
    except ValueError as exc:
        raise NpyError(f"the body is not an .npy array: {exc}") from None
    if version not in _READERS:
        raise NpyError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    width = _WIDTH[version[0]]
    header = _parse(data[: 8 + width + int.from_bytes(data[8 : 8 + width], "little")])
    if isinstance(header, str):
        raise NpyError(header)
    declared, sent = header.size - header.offset, len(data) - header.offset
    raise NpyError(f"the header declares shape {list(header.shape)} ({declared} bytes) but {sent} bytes follow it")


@lru_cache(maxsize=256)
def _parse(header: bytes) -> Header | str:
    """The parsed header, or why it is not one (cached too: a flood of one bad header parses once)."""
    buffer = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(buffer)
        shape, fortran, dtype = _READERS[version](buffer, max_header_size=MAX_HEADER_SIZE)
    except ValueError as exc:
        return f"the body is not an .npy array: {exc}"
    if dtype.hasobject:  # Python objects: only a pickle could carry them
        return f"the body is not an .npy array of numbers (its dtype is {dtype.str})"
    if len(shape) == 0:
        return "the array is 0-d (a single number): send one sample or an array of samples"
    offset = buffer.tell()
    plain = version == (1, 0) and not fortran and dtype.kind in "iuf"
    size = offset + math.prod(shape) * dtype.itemsize
    return Header(tuple(shape), dtype, bool(fortran), version, offset, size, plain)


def read_npy(data: bytes) -> NDArray[Any]:
    """The array held by one `.npy` file's bytes (a read-only view of them), or `NpyError` saying
    why it is not one. Nothing is allocated before the header has been checked, so a header that
    declares a huge shape over a short body costs nothing."""
    header = read_header(data)
    flat = np.frombuffer(data, dtype=header.dtype, count=math.prod(header.shape), offset=header.offset)
    return flat.reshape(header.shape, order="F" if header.fortran else "C")


class NpyDecoder:
    """Decodes stored `.npy` samples of one shape as float32, None for any other shape or kind; the
    common case (the header `npy_bytes` writes for float32) is a slice, not a parse."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.header = _header_bytes(shape, "<f4")
        self.size = len(self.header) + math.prod(shape) * 4

    def decode(self, blob: bytes) -> NDArray[np.float32] | None:
        if len(blob) == self.size and blob.startswith(self.header):
            return np.frombuffer(blob, dtype="<f4", offset=len(self.header)).reshape(self.shape)
        try:
            array = read_npy(blob)
        except NpyError:
            return None
        if array.shape != self.shape or not np.issubdtype(array.dtype, np.number):
            return None
        return array.astype(np.float32)
