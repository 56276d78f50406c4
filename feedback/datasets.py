"""Versioned, immutable data sets: training versions compiled from the current labels up to a
watermark, and frozen validation versions.

A version is a folder of Parquet parts (rows sorted by item id) and a `manifest.json`. Its id is
DVC 3's directory hash of those files, so `dvc add` on the folder records `md5: <id>.dir`. The same
inputs give the same bytes, hence the same id; a version's folder is written once and never again.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import NDArray

from feedback import dataset_store
from feedback.dataset_store import DatasetVersion, Kind
from feedback.records import npy_bytes, npy_load
from feedback.review_store import Invalid, User
from models import digits
from models.provenance import code_version
from models.signature import Signature

logger = logging.getLogger(__name__)

FORMAT = "loop-dataset/1"
MANIFEST = "manifest.json"
PART = "data/part-{:05d}.parquet"
ROWS_PER_PART = 262_144
ROW_GROUP = 32_768
CHUNK = 20_000

Progress = Callable[[int, int], None]  # (rows done, rows expected)
# (item id, source, label, revision, pixels or None, .npy bytes or None), in item id order
_Row = tuple[str, str, str, int | None, NDArray[np.float32] | None, bytes | None]


class VersionNotFound(LookupError):
    """No such dataset version."""


@dataclass(frozen=True)
class LabelSchema:
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def of(cls, signature: Signature) -> LabelSchema:
        """The labels and input a model's signature declares."""
        return cls(class_names=signature.class_names, input_shape=signature.input_shape, dtype=signature.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "input_shape": list(self.input_shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Originals:
    """The data a model was first trained on, split once into training and validation rows."""

    name: str
    split_id: str
    seed: int
    train_ids: tuple[str, ...]
    train_inputs: NDArray[np.float32]
    train_labels: tuple[str, ...]
    validation_ids: tuple[str, ...]
    validation_inputs: NDArray[np.float32]
    validation_labels: tuple[str, ...]


def originals_for(model_name: str, split_path: Path) -> Originals:
    """The original data of a model that ships with it (the built-in one), or `Invalid` saying so."""
    if model_name != digits.DEFAULT_MODEL_NAME:
        raise Invalid(f"{model_name} has no original data here: compile it without the original rows")
    return digits_originals(split_path)


def digits_originals(split_path: Path, *, seed: int = 0, train: Sequence[int] | None = None) -> Originals:
    """scikit-learn's bundled digits with the frozen split at `split_path` (created once); `train`
    narrows the training side to those rows (the validation side stays whole)."""
    data = digits.load()
    split = digits.load_or_create_split(split_path, data, seed=seed)
    train_idx = np.asarray(split.train_indices if train is None else train)
    val_idx = np.asarray(split.validation_indices)
    if not set(train_idx.tolist()) <= set(split.train_indices):
        raise ValueError("the training rows must come from the split's training side")
    names = digits.CLASS_NAMES
    return Originals(
        name="digits",
        split_id=split.split_id,
        seed=split.seed,
        train_ids=tuple(f"digits:{i:05d}" for i in train_idx),
        train_inputs=data.images[train_idx],
        train_labels=tuple(names[i] for i in data.labels[train_idx]),
        validation_ids=tuple(f"digits:{i:05d}" for i in val_idx),
        validation_inputs=data.images[val_idx],
        validation_labels=tuple(names[i] for i in data.labels[val_idx]),
    )


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


# -- writing --------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    revisions: list[int | None] = field(default_factory=list)
    inputs: list[NDArray[np.float32]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _schema(shape: tuple[int, ...]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("label_index", pa.int16(), nullable=False),
            pa.field("revision", pa.int64()),
            pa.field("input", pa.list_(pa.float32(), int(np.prod(shape))), nullable=False),
        ],
        metadata={"input_shape": json.dumps(list(shape))},
    )


class _PartWriter:
    """Writes rows into Parquet parts of ROWS_PER_PART rows each: same rows, same bytes."""

    def __init__(self, root: Path, schema: LabelSchema) -> None:
        self.root = root
        self.label_schema = schema
        self.schema = _schema(schema.input_shape)
        self.index = {name: i for i, name in enumerate(schema.class_names)}
        self.part = -1
        self.rows_in_part = 0
        self.writer: pq.ParquetWriter | None = None
        self.files: list[str] = []
        self.per_class: Counter[str] = Counter()
        self.per_source: Counter[str] = Counter()
        self.rows = 0

    def write(self, chunk: _Chunk) -> None:
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

    def _table(self, chunk: _Chunk, start: int, stop: int) -> pa.Table:
        flat = np.stack(chunk.inputs[start:stop]).astype(np.float32, copy=False).reshape(stop - start, -1)
        width = flat.shape[1]
        inputs = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), width)
        labels = chunk.labels[start:stop]
        return pa.Table.from_arrays(
            [
                pa.array(chunk.ids[start:stop], type=pa.string()),
                pa.array(chunk.sources[start:stop], type=pa.string()),
                pa.array(labels, type=pa.string()),
                pa.array([self.index[x] for x in labels], type=pa.int16()),
                pa.array(chunk.revisions[start:stop], type=pa.int64()),
                inputs,
            ],
            schema=self.schema,
        )

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


def _write_version(
    rows: Iterable[_Chunk],
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
            raise Invalid("no rows to write: nothing is labelled and no original data is included")
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


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    item_ids: list[str]
    inputs: NDArray[np.float32]
    labels: NDArray[np.int64]
    manifest: dict[str, Any]


def read_version(uri: str) -> Loaded:
    """The rows of a version folder as arrays; checks that the files still hash to its id."""
    fs, root = fsspec.core.url_to_fs(uri)
    manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    shape = tuple(manifest["label_schema"]["input_shape"])
    tables = []
    for name in manifest["files"]:
        with fs.open(f"{root}/{name}", "rb") as f:
            tables.append(pq.read_table(f, columns=["item_id", "label_index", "input"]))
    table = pa.concat_tables(tables)
    inputs = table.column("input").combine_chunks().flatten().to_numpy().reshape(len(table), *shape)
    return Loaded(
        item_ids=table.column("item_id").to_pylist(),
        inputs=np.array(inputs, dtype=np.float32),  # a writable copy: Arrow's buffers are read-only
        labels=table.column("label_index").to_numpy().astype(np.int64),
        manifest=manifest,
    )


def verify(uri: str, version_id: str) -> None:
    """Raise if the files at `uri` no longer hash to `version_id`."""
    fs, root = fsspec.core.url_to_fs(uri)
    actual = tree_hash(fs, root)
    if actual != version_id:
        raise ValueError(f"version {version_id} at {uri} hashes to {actual}: its files were changed")


# -- validation versions --------------------------------------------------------------------------


def _validation_rows(ids: Sequence[str], inputs: NDArray[np.float32], labels: Sequence[str]) -> Iterator[_Chunk]:
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    for start in range(0, len(order), CHUNK):
        chunk = _Chunk()
        for i in order[start : start + CHUNK]:
            chunk.ids.append(ids[i])
            chunk.sources.append("original")
            chunk.labels.append(labels[i])
            chunk.revisions.append(None)
            chunk.inputs.append(inputs[i])
        yield chunk


def freeze_validation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    originals: Originals,
    schema: LabelSchema,
    root_url: str,
    actor: User | None = None,
) -> DatasetVersion:
    """The model's validation version, frozen from the original split the first time it is asked for."""
    current = dataset_store.current_validation(conn=conn, model_name=model_name)
    if current is not None:
        return current
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.VALIDATION.value,
        "model_name": model_name,
        "label_schema": schema.to_dict(),
        "source": {"original": originals.name, "split_id": originals.split_id, "seed": originals.seed},
        "parent_id": None,
        "fixes": [],
        "code_version": code_version(),
    }
    written = _write_version(
        _validation_rows(originals.validation_ids, originals.validation_inputs, originals.validation_labels),
        schema=schema,
        manifest=manifest,
        root_url=root_url,
        progress=None,
    )
    logger.info("froze validation version %s (%d rows)", written.id, written.rows)
    return _record(conn, written, Kind.VALIDATION, model_name, actor=actor)


@dataclass(frozen=True)
class LabelFix:
    item_id: str
    label: str
    reason: str


def fix_validation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    fixes: Sequence[LabelFix],
    schema: LabelSchema,
    root_url: str,
    actor: User,
) -> DatasetVersion:
    """A new validation version with `fixes` applied to the current one, which stays as it was."""
    parent = dataset_store.current_validation(conn=conn, model_name=model_name)
    if parent is None:
        raise Invalid(f"{model_name} has no validation version yet; compile a training version first")
    if not fixes:
        raise Invalid("no label fixes given")
    loaded = read_version(parent.uri)
    labels = [schema.class_names[i] for i in loaded.labels]
    position = {item: i for i, item in enumerate(loaded.item_ids)}
    for fix in fixes:
        if fix.item_id not in position:
            raise Invalid(f"{fix.item_id!r} is not in validation version {parent.id}")
        if fix.label not in schema.class_names:
            raise Invalid(f"label {fix.label!r} is not one of {', '.join(schema.class_names)}")
        if not fix.reason.strip():
            raise Invalid(f"a reason is required for the fix of {fix.item_id}")
        if labels[position[fix.item_id]] == fix.label:
            raise Invalid(f"{fix.item_id} is already labelled {fix.label!r}")
        labels[position[fix.item_id]] = fix.label
    manifest = dict(parent.manifest)
    manifest.update(
        parent_id=parent.id,
        fixes=[*parent.manifest.get("fixes", []), *({"item_id": f.item_id, "label": f.label} for f in fixes)],
        code_version=code_version(),
    )
    for key in ("rows", "per_class", "per_source", "files"):
        manifest.pop(key, None)
    written = _write_version(
        _validation_rows(loaded.item_ids, loaded.inputs, labels),
        schema=schema,
        manifest=manifest,
        root_url=root_url,
        progress=None,
    )
    logger.info("validation version %s replaces %s (%d fixes)", written.id, parent.id, len(fixes))
    return _record(conn, written, Kind.VALIDATION, model_name, actor=actor, parent_id=parent.id)


# -- training versions ----------------------------------------------------------------------------


def input_key(pixels: NDArray[np.float32]) -> bytes:
    """Identity of an input's content: the same pixels give the same key whatever their source."""
    return hashlib.blake2b(np.ascontiguousarray(pixels, dtype=np.float32).tobytes(), digest_size=16).digest()


def compile_training(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    originals: Originals | None,
    validation: DatasetVersion,
    root_url: str,
    watermark: int | None = None,
    actor: User | None = None,
    progress: Progress | None = None,
) -> DatasetVersion:
    """Compile the training version at `watermark` (default: every settled annotation).

    Rows: the original training rows (unless `originals` is None) and every item whose current
    label as of the watermark is a class of `schema`, left out when discarded, disputed or
    unreviewed, when its input was erased, has another shape, or equals a validation input.
    """
    if not conn.autocommit:
        raise ValueError("compile_training needs a connection in autocommit mode (it opens its own transactions)")
    settled = dataset_store.settled_watermark(conn=conn)
    if watermark is None:
        watermark = settled
    elif watermark < 0 or watermark > settled:
        raise Invalid(f"watermark {watermark} is not a settled annotation revision (0..{settled})")
    if validation.kind is not Kind.VALIDATION:
        raise Invalid(f"{validation.id} is a {validation.kind.value} version, not a validation version")
    held_out = read_version(validation.uri)
    held_out_ids = set(held_out.item_ids)
    held_out_inputs = {input_key(x) for x in held_out.inputs}
    skipped: Counter[str] = Counter()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.TRAINING.value,
        "model_name": model_name,
        "watermark": watermark,
        "validation_id": validation.id,
        "seed": originals.seed if originals is not None else None,
        "label_schema": schema.to_dict(),
        "filters": {
            "labels": "current label as of the watermark (status 'reviewed')",
            "excluded": [
                "discarded, disputed and unreviewed items",
                "items whose input was erased",
                "inputs of another shape",
                "labels outside the label schema",
                "validation items and any input equal to a validation input",
            ],
            "original": None if originals is None else {"name": originals.name, "split_id": originals.split_id},
        },
        "code_version": code_version(),
    }
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        expected = dataset_store.count_labelled(conn=conn, watermark=watermark)
        if originals is not None:
            expected += len(originals.train_ids)
        sources: list[Iterator[_Row]] = [_labelled(conn, watermark)]
        if originals is not None:
            sources.append(_original(originals))
        merged = heapq.merge(*sources, key=lambda row: row[0])
        rows = _chunks(merged, schema=schema, held_ids=held_out_ids, held_inputs=held_out_inputs, skipped=skipped)
        manifest["skipped"] = skipped  # filled in while the rows are written
        written = _write_version(
            rows, schema=schema, manifest=manifest, root_url=root_url, progress=progress, expected=expected
        )
    logger.info(
        "compiled training version %s: %d rows at watermark %d (skipped: %s)",
        written.id,
        written.rows,
        watermark,
        dict(skipped) or "none",
    )
    return _record(conn, written, Kind.TRAINING, model_name, actor=actor, watermark=watermark, validation=validation)


def _labelled(conn: psycopg.Connection, watermark: int) -> Iterator[_Row]:
    for item in dataset_store.labelled_items(conn=conn, watermark=watermark):
        yield str(item.id), item.source, item.label, item.revision, None, item.input_npy


def _original(
    originals: Originals,
) -> Iterator[_Row]:
    order = sorted(range(len(originals.train_ids)), key=lambda i: originals.train_ids[i])
    for i in order:
        yield originals.train_ids[i], "original", originals.train_labels[i], None, originals.train_inputs[i], None


def _chunks(
    rows: Iterator[_Row],
    *,
    schema: LabelSchema,
    held_ids: set[str],
    held_inputs: set[bytes],
    skipped: Counter[str],
) -> Iterator[_Chunk]:
    classes = set(schema.class_names)
    decoder = _NpyDecoder(schema.input_shape)
    chunk = _Chunk()
    for item_id, source, label, revision, given, blob in rows:
        if label not in classes:
            skipped["label outside the schema"] += 1
            continue
        pixels = given if given is not None else decoder.decode(blob or b"")
        if pixels is None:
            skipped["input of another shape"] += 1
            continue
        if item_id in held_ids or input_key(pixels) in held_inputs:
            skipped["validation item or equal to one"] += 1
            continue
        chunk.ids.append(item_id)
        chunk.sources.append(source)
        chunk.labels.append(label)
        chunk.revisions.append(revision)
        chunk.inputs.append(pixels)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = _Chunk()
    if len(chunk):
        yield chunk


class _NpyDecoder:
    """Decodes stored .npy inputs; the common case (the expected header) is a slice, not a parse."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.header = npy_bytes(np.zeros(shape, dtype=np.float32))[: -int(np.prod(shape)) * 4]

    def decode(self, blob: bytes) -> NDArray[np.float32] | None:
        if blob.startswith(self.header) and len(blob) == len(self.header) + int(np.prod(self.shape)) * 4:
            return np.frombuffer(blob, dtype="<f4", offset=len(self.header)).reshape(self.shape)
        try:
            array = npy_load(blob)
        except ValueError:
            return None
        if array.shape != self.shape or not np.issubdtype(array.dtype, np.number):
            return None
        return array.astype(np.float32)


def _record(
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
    return dataset_store.record_version(conn=conn, version=version, actor=actor)
