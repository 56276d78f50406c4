"""Large inputs (images) in an object store: a folder, or an S3-compatible bucket, addressed by an
fsspec URL and named by their content's SHA-256 (`sha256/ab/abcdef...`): the same bytes are one
object however many predictions sent them, and an object's name proves its content.

A database's inputs live in one store, so the store is attached to the database (`attach`, by
the service, `loop ingest` and the command line from LOOP_BLOB_URL) and every reader of that
database finds it by its connection (`of`). The ingest worker moves inputs of at least
`min_bytes` there (`offload`) before the row is written; the row keeps the key, size and hash, its
`input_type` the media type. Erasure and retention delete an object once no row names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import psycopg
from fsspec.implementations.local import LocalFileSystem

from feedback.errors import Unavailable
from feedback.predictions.partitions import database_key
from feedback.predictions.records import Row, ShadowRow

logger = logging.getLogger(__name__)

WRITERS = 8  # objects written at once (an S3 put waits on the network)


@dataclass(frozen=True)
class BlobStore:
    url: str
    min_bytes: int  # inputs at least this large are stored here
    fs: Any = field(init=False, repr=False, compare=False)
    root: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url)
        object.__setattr__(self, "fs", fs)
        object.__setattr__(self, "root", root.rstrip("/"))

    @staticmethod
    def key(sha256: str) -> str:
        return f"sha256/{sha256[:2]}/{sha256}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, data: bytes) -> tuple[str, str]:
        """Store `data` (again, harmlessly, if it is there); its key and SHA-256."""
        sha256 = hashlib.sha256(data).hexdigest()
        key = self.key(sha256)
        path = self._path(key)
        if isinstance(self.fs, LocalFileSystem):
            # A local file appears whole or not at all: written aside, then renamed into place
            # (plain os calls: fsspec's own cost a file was most of the write's).
            os.makedirs(os.path.dirname(path), exist_ok=True)
            scratch = f"{path}.{uuid.uuid4().hex}.part"
            with open(scratch, "wb") as f:
                f.write(data)
            os.replace(scratch, path)
        else:
            self.fs.pipe_file(path, data)  # an object store's put is atomic
        return key, sha256

    def get(self, key: str) -> bytes:
        """The object's bytes, checked against its name."""
        try:
            data: bytes = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise Unavailable(f"input {key} is missing from the object store {self.url}") from None
        if hashlib.sha256(data).hexdigest() != key.rsplit("/", 1)[-1]:
            raise Unavailable(f"input {key} in {self.url} does not match its hash")
        return data

    def sweep(self, older_than_s: float = 3600.0) -> int:
        """Delete the scratch files of local writes cut short (a worker killed mid-write); how many."""
        if not isinstance(self.fs, LocalFileSystem) or not self.fs.exists(self.root):
            return 0
        cutoff = time.time() - older_than_s
        stale = [p for p in self.fs.glob(f"{self.root}/sha256/*/*.part") if self.fs.modified(p).timestamp() < cutoff]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
        return len(stale)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(key))

    def offload(self, rows: Sequence[Row | ShadowRow]) -> list[Row | ShadowRow]:
        """Rows whose inputs of at least `min_bytes` are now in the store (the row keeps the key);
        `Unavailable` when the store cannot be written (the caller tries again)."""
        large = [
            i
            for i, r in enumerate(rows)
            if isinstance(r, Row) and r.input_npy is not None and len(r.input_npy) >= self.min_bytes
        ]
        if not large:
            return list(rows)
        inputs = [getattr(rows[i], "input_npy", None) or b"" for i in large]
        try:
            with ThreadPoolExecutor(min(WRITERS, len(large))) as pool:
                stored = list(pool.map(self.put, inputs))
        except Exception as exc:  # an object store fails in its own ways (OSError, botocore's, ...)
            raise Unavailable(f"the object store {self.url} cannot be written: {exc!r}") from exc
        out = list(rows)
        for i, data, (key, sha256) in zip(large, inputs, stored, strict=True):
            row = rows[i]
            assert isinstance(row, Row)
            out[i] = row._replace(input_npy=None, input_key=key, input_size=len(data), input_sha256=sha256)
        return out


_attached: dict[str, BlobStore] = {}


Connection = psycopg.Connection | psycopg.AsyncConnection[Any]


def attach(database: Connection | str, store: BlobStore | None) -> None:
    """Make `store` the object store of a database (a URL, or a connection to it) in this process."""
    if store is None:
        _attached.pop(database_key(database), None)
    else:
        _attached[database_key(database)] = store


def of(conn: Connection) -> BlobStore | None:
    """The object store attached to `conn`'s database, if any."""
    return _attached.get(database_key(conn))


def read(conn: Connection, data: bytes | None, key: str | None) -> bytes | None:
    """An input as a row holds it: its bytes, or its object's; None when erased."""
    if data is not None or key is None:
        return None if data is None else bytes(data)
    store = of(conn)
    if store is None:
        raise Unavailable(f"input {key} is in an object store, and none is configured here (LOOP_BLOB_URL)")
    return store.get(key)


def forget_unreferenced(conn: psycopg.Connection, keys: Iterable[str]) -> int:
    """Delete the objects of `keys` that no row names any more; how many."""
    store = of(conn)
    wanted = sorted(set(keys))
    if store is None or not wanted:
        return 0
    gone = 0
    for start in range(0, len(wanted), 1000):
        chunk = wanted[start : start + 1000]
        named = {
            r[0] for r in conn.execute("SELECT DISTINCT input_key FROM predictions WHERE input_key = ANY(%s)", (chunk,))
        }
        unreferenced = [k for k in chunk if k not in named]
        store.delete(unreferenced)
        gone += len(unreferenced)
    return gone
