"""The object store of large inputs on a folder: content-addressed writes, reads checked against
their names, offloading rows, sweeping cut-short writes."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from feedback.errors import Unavailable
from feedback.predictions.blobs import BlobStore
from feedback.predictions.records import Row

pytestmark = pytest.mark.unit


def row(data: bytes) -> Row:
    return Row(uuid.uuid4(), datetime.now(UTC), "m", "v", "a", 0, 0.9, b"\0\0\0\0", data, "r", {}, "image/png")


def test_objects_are_named_by_their_content_and_read_back_checked(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), min_bytes=4)
    key, digest = store.put(b"image bytes")
    assert digest == hashlib.sha256(b"image bytes").hexdigest() and key == f"sha256/{digest[:2]}/{digest}"
    assert store.put(b"image bytes") == (key, digest)  # the same bytes: the same object
    assert store.get(key) == b"image bytes"
    (tmp_path / key).write_bytes(b"tampered")
    with pytest.raises(Unavailable, match="does not match its hash"):
        store.get(key)
    store.delete([key, key])
    with pytest.raises(Unavailable, match="missing"):
        store.get(key)


def test_only_large_inputs_are_offloaded_and_rows_keep_key_size_and_hash(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), min_bytes=4)
    small, large = row(b"abc"), row(b"abcdef")
    kept, moved = store.offload([small, large])
    assert kept == small
    assert isinstance(moved, Row) and moved.input_npy is None and moved.input_size == 6
    assert moved.input_sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert moved.input_key is not None and store.get(moved.input_key) == b"abcdef"


def test_writes_cut_short_are_swept_once_stale(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), min_bytes=1)
    key, _ = store.put(b"kept")
    stale, fresh = tmp_path / f"{key}.1.part", tmp_path / f"{key}.2.part"
    stale.write_bytes(b"ha"), fresh.write_bytes(b"ha")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.sweep(older_than_s=3600) == 1
    assert not stale.exists() and fresh.exists() and store.get(key) == b"kept"
