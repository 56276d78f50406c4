"""Dataset versions as folders: written once (Parquet parts of rows sorted by item id, image inputs
as files beside them, a `manifest.json`), named by DVC 3's directory hash, registered in Postgres,
read back, and verified against their id.

The same inputs give the same bytes, hence the same id, so `dvc add` on a version's folder records
`md5: <id>.dir`; a version's folder is published whole (a rename on local disk) and never
rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import NDArray

from feedback.datasets import store
from feedback.datasets.schema import Blob, Input, LabelSchema, Progress, Rows
from feedback.datasets.store import DatasetVersion, Kind
from feedback.errors import Conflict
from feedback.review.users import User
from models import images

logger = logging.getLogger(__name__)

FORMAT = "loop-dataset/1"
MANIFEST = "manifest.json"
PART = "data/part-{:05d}.parquet"
ROWS_PER_PART = 262_144
ROW_GROUP = 32_768
CHUNK = 20_000

IMAGES = "images"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


# -- DVC's directory hash -------------------------------------------------------------------------


def _md5(fs: fsspec.AbstractFileSystem, path: str, block: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with fs.open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_dir_hash(files: Mapping[str, str]) -> str:
    """DVC 3's hash of a directory from {relative posix path: md5 of the file}, without '.dir'.

    DVC lists {"md5", "relpath"} entries sorted by path, serialises them with `json.dumps(...,
    sort_keys=True)` and takes the md5 of that (dvc_data.hashfile.tree.Tree.digest).
    """
    entries = [{"md5": files[p], "relpath": p} for p in sorted(files)]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode(), usedforsecurity=False).hexdigest()


def tree_hash(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """DVC's directory hash of every file below `root` on any fsspec filesystem, read in blocks."""
    prefix = root.rstrip("/") + "/"
    return dvc_dir_hash({path[len(prefix) :]: _md5(fs, path) for path in fs.find(root)})


def dir_hash(root: Path) -> str:
    return tree_hash(LocalFileSystem(), root.resolve().as_posix())


# -- writing ---------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Rows on their way into a version, column by column, in item id order."""

    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    revisions: list[int | None] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, other: Chunk, i: int) -> None:
        self.ids.append(other.ids[i])
        self.sources.append(other.sources[i])
        self.labels.append(other.labels[i])
        self.revisions.append(other.revisions[i])
        self.inputs.append(other.inputs[i])

    def extend(self, other: Chunk) -> None:
        for i in range(len(other)):
            self.append(other, i)


def _arrow_schema(schema: LabelSchema) -> pa.Schema:
    fields = [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("label_index", pa.int16(), nullable=False),
        pa.field("revision", pa.int64()),
    ]
    if schema.image is not None:
        fields += [pa.field("file", pa.string(), nullable=False), pa.field("media_type", pa.string(), nullable=False)]
    else:
        fields.append(pa.field("input", pa.list_(pa.float32(), int(np.prod(schema.input_shape))), nullable=False))
    return pa.schema(fields, metadata={"input_shape": json.dumps(list(schema.input_shape))})


def image_file(item_id: str, media_type: str) -> str:
    """Where an item's image lives in a version: the same item has the same file in every version."""
    digest = hashlib.blake2b(item_id.encode(), digest_size=12, usedforsecurity=False).hexdigest()
    return f"{IMAGES}/{digest[:2]}/{digest}.{EXTENSIONS[media_type]}"


class _PartWriter:
    """Writes rows into Parquet parts of ROWS_PER_PART rows each (and image inputs into files
    beside them): same rows, same bytes."""

    def __init__(self, root: Path, schema: LabelSchema) -> None:
        self.root = root
        self.label_schema = schema
        self.schema = _arrow_schema(schema)
        self.index = {name: i for i, name in enumerate(schema.class_names)}
        self.part = -1
        self.rows_in_part = 0
        self.writer: pq.ParquetWriter | None = None
        self.files: list[str] = []
        self.per_class: Counter[str] = Counter()
        self.per_source: Counter[str] = Counter()
        self.rows = 0

    def write(self, chunk: Chunk) -> None:
        start = 0
        while start < len(chunk):
            if self.writer is None or self.rows_in_part == ROWS_PER_PART:
                self._next_part()
            assert self.writer is not None
            take = min(len(chunk) - start, ROWS_PER_PART - self.rows_in_part)
            self.writer.write_table(self._table(chunk, start, start + take), row_group_size=ROW_GROUP)
            self.rows_in_part += take
            start += take
        self.per_class.update(chunk.labels)
        self.per_source.update(chunk.sources)
        self.rows += len(chunk)

    def _table(self, chunk: Chunk, start: int, stop: int) -> pa.Table:
        labels = chunk.labels[start:stop]
        columns = [
            pa.array(chunk.ids[start:stop], type=pa.string()),
            pa.array(chunk.sources[start:stop], type=pa.string()),
            pa.array(labels, type=pa.string()),
            pa.array([self.index[x] for x in labels], type=pa.int16()),
            pa.array(chunk.revisions[start:stop], type=pa.int64()),
        ]
        if self.label_schema.image is not None:
            blobs = [b for b in chunk.inputs[start:stop] if isinstance(b, Blob)]
            assert len(blobs) == stop - start, "an image version holds image inputs only"
            names = [self._write_image(item, blob) for item, blob in zip(chunk.ids[start:stop], blobs, strict=True)]
            columns += [pa.array(names, type=pa.string()), pa.array([b.media_type for b in blobs], type=pa.string())]
        else:
            tensors = [x for x in chunk.inputs[start:stop] if not isinstance(x, Blob)]
            assert len(tensors) == stop - start, "a tensor version holds tensor inputs only"
            flat = np.stack(tensors).astype(np.float32, copy=False).reshape(stop - start, -1)
            columns.append(
                pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), flat.shape[1])
            )
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _write_image(self, item_id: str, blob: Blob) -> str:
        name = image_file(item_id, blob.media_type)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.data)
        return name

    def _next_part(self) -> None:
        self.close()
        self.part += 1
        self.rows_in_part = 0
        name = PART.format(self.part)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(name)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd", use_dictionary=["source", "label"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass(frozen=True)
class Written:
    id: str
    uri: str
    rows: int
    per_class: dict[str, int]
    manifest: dict[str, Any]


def write_version(
    rows: Iterable[Chunk],
    *,
    schema: LabelSchema,
    manifest: dict[str, Any],
    root_url: str,
    progress: Progress | None,
    expected: int = 0,
) -> Written:
    """Write the rows and manifest to a scratch folder, hash it, and publish it as `<root>/<id>/`."""
    fs, root = fsspec.core.url_to_fs(root_url)
    local = isinstance(fs, LocalFileSystem)
    scratch_parent = Path(root) if local else Path(tempfile.gettempdir())
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".compiling-", dir=scratch_parent))
    try:
        writer = _PartWriter(scratch, schema)
        try:
            for chunk in rows:
                writer.write(chunk)
                if progress is not None:
                    progress(writer.rows, max(expected, writer.rows))
        finally:
            writer.close()
        if writer.rows == 0:
            raise Conflict("no rows to write: nothing is labelled and no original data is included")
        manifest["rows"] = writer.rows
        manifest["per_class"] = {name: writer.per_class.get(name, 0) for name in schema.class_names}
        manifest["per_source"] = dict(sorted(writer.per_source.items()))
        manifest["files"] = writer.files
        (scratch / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
        version_id = dir_hash(scratch)
        target = f"{root.rstrip('/')}/{version_id}"
        if fs.exists(f"{target}/{MANIFEST}"):
            logger.info("version %s exists at %s; left as it is", version_id, target)
        elif local:
            for path in scratch.rglob("*"):
                if path.is_file():
                    path.chmod(0o444)  # a version is never rewritten
            try:
                os.replace(scratch, target)
            except OSError:
                # Another compile of the same labels published the same id first: same bytes.
                if not Path(target, MANIFEST).exists():
                    raise
                logger.info("version %s was published concurrently at %s", version_id, target)
        else:
            fs.put(str(scratch), target, recursive=True)
        uri = str(Path(target).resolve()) if local else fs.unstrip_protocol(target)
        return Written(version_id, uri, writer.rows, manifest["per_class"], manifest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def chunks_of(rows: Rows) -> Iterator[Chunk]:
    """Rows from memory (original data, a validation version's rows) in id order, as source 'original'."""
    order = sorted(range(len(rows)), key=lambda i: rows.ids[i])
    for start in range(0, len(order), CHUNK):
        chunk = Chunk()
        for i in order[start : start + CHUNK]:
            chunk.ids.append(rows.ids[i])
            chunk.sources.append("original")
            chunk.labels.append(rows.labels[i])
            chunk.revisions.append(None)
            chunk.inputs.append(rows.inputs[i])
        yield chunk


def record(
    conn: psycopg.Connection,
    written: Written,
    kind: Kind,
    model_name: str,
    *,
    actor: User | None,
    watermark: int | None = None,
    validation: DatasetVersion | None = None,
    parent_id: str | None = None,
) -> DatasetVersion:
    """Register a written version in Postgres."""
    version = DatasetVersion(
        id=written.id,
        kind=kind,
        model_name=model_name,
        uri=written.uri,
        watermark=watermark,
        validation_id=validation.id if validation is not None else None,
        parent_id=parent_id,
        rows=written.rows,
        per_class=written.per_class,
        manifest=written.manifest,
        created_by=actor.name if actor else None,
        created_at=datetime.now(UTC),
    )
    return store.record_version(conn=conn, version=version, actor=actor)


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """A version's rows: ids, class indices, and inputs as tensors (image files decoded and
    pre-processed by the version's spec on first use) or as stored (`raw`)."""

    item_ids: list[str]
    labels: NDArray[np.int64]
    manifest: dict[str, Any]
    schema: LabelSchema
    tensors: NDArray[np.float32] | None = None
    blobs: list[Blob] | None = None

    @cached_property
    def inputs(self) -> NDArray[np.float32]:
        if self.tensors is not None:
            return self.tensors
        assert self.blobs is not None and self.schema.image is not None
        out = np.empty((len(self.blobs), *self.schema.input_shape), dtype=np.float32)
        for i, blob in enumerate(self.blobs):
            out[i] = images.preprocess(blob.data, self.schema.image)
        return out

    @property
    def raw(self) -> Sequence[Input]:
        """The inputs as the version stores them: tensors, or image files as sent."""
        if self.blobs is not None:
            return self.blobs
        assert self.tensors is not None
        return list(self.tensors)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.schema.class_names[i] for i in self.labels)


def item_ids(uri: str) -> list[str]:
    """The item ids of a version folder, in its order (no inputs read)."""
    fs, root = fsspec.core.url_to_fs(uri)
    manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    ids: list[str] = []
    for name in manifest["files"]:
        with fs.open(f"{root}/{name}", "rb") as f:
            ids.extend(pq.read_table(f, columns=["item_id"]).column("item_id").to_pylist())
    return ids


def read_version(uri: str) -> Loaded:
    """The rows of a version folder."""
    fs, root = fsspec.core.url_to_fs(uri)
    manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    schema = LabelSchema.from_dict(manifest["label_schema"])
    columns = ["item_id", "label_index", *(["file", "media_type"] if schema.image is not None else ["input"])]
    tables = []
    for name in manifest["files"]:
        with fs.open(f"{root}/{name}", "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    table = pa.concat_tables(tables)
    ids = table.column("item_id").to_pylist()
    labels = table.column("label_index").to_numpy().astype(np.int64)
    if schema.image is not None:
        files = table.column("file").to_pylist()
        blobs = [
            Blob(fs.cat_file(f"{root}/{f}"), t)
            for f, t in zip(files, table.column("media_type").to_pylist(), strict=True)
        ]
        return Loaded(item_ids=ids, labels=labels, manifest=manifest, schema=schema, blobs=blobs)
    inputs = table.column("input").combine_chunks().flatten().to_numpy().reshape(len(table), *schema.input_shape)
    tensors = np.array(inputs, dtype=np.float32)  # a writable copy: Arrow's buffers are read-only
    return Loaded(item_ids=ids, labels=labels, manifest=manifest, schema=schema, tensors=tensors)


def verify(uri: str, version_id: str) -> None:
    """Raise if the files at `uri` no longer hash to `version_id`."""
    fs, root = fsspec.core.url_to_fs(uri)
    actual = tree_hash(fs, root)
    if actual != version_id:
        raise ValueError(f"version {version_id} at {uri} hashes to {actual}: its files were changed")
