"""Versioned, immutable data sets: a model's original data imported once, training versions
compiled from the current labels up to a watermark, and frozen validation versions.

A version is a folder of Parquet parts (rows sorted by item id) and a `manifest.json`; an image
model's inputs are image files beside them (`images/ab/<hash>.png`, as sent), the rows naming their
file. Its id is DVC 3's directory hash of the folder, so `dvc add` on it records `md5: <id>.dir`.
The same inputs give the same bytes, hence the same id; a version's folder is written once and
never again.
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

from feedback import dataset_store
from feedback.dataset_store import DatasetVersion, Kind
from feedback.records import npy_bytes, npy_load
from feedback.review_store import Conflict, Invalid, NotFound, User
from models import builtin, images
from models.provenance import code_version
from models.signature import Signature
from models.spec import ImageInput, ModelSpec

logger = logging.getLogger(__name__)

FORMAT = "loop-dataset/1"
MANIFEST = "manifest.json"
PART = "data/part-{:05d}.parquet"
ROWS_PER_PART = 262_144
ROW_GROUP = 32_768
CHUNK = 20_000

IMAGES = "images"
MIN_PER_CLASS = 5  # an imported class needs this many samples for the split to hold out one of each
VALIDATION_FRACTION = 0.2  # of a model's data held out as its frozen validation version
MIN_JUDGED_PER_CLASS = 5  # judged items a class needs before a validation version is drawn from verdicts
MIN_VALIDATION_PER_CLASS = 2  # held out of each class, at the least, when drawing from verdicts
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}

Progress = Callable[[int, int], None]  # (rows done, rows expected)


@dataclass(frozen=True)
class Blob:
    """An image input as sent: its encoded bytes and media type."""

    data: bytes
    media_type: str


Input = NDArray[np.float32] | Blob  # a tensor model's sample, or an image model's file
# (item id, source, label, revision, input or None, stored bytes or None, stored media type), in id order
_Row = tuple[str, str, str, int | None, Input | None, bytes | None, str | None]


@dataclass(frozen=True)
class LabelSchema:
    """The classes of a model and what its inputs are: tensors of `input_shape`, or images as sent
    (`image`, which also says how to turn them into tensors of `input_shape`)."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    dtype: str = "float32"
    image: ImageInput | None = None

    @classmethod
    def of(cls, model: ModelSpec | Signature) -> LabelSchema:
        """The labels and input a model's spec (or, for a tensor model, its signature) declares."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec.of_signature(model)
        signature = spec.signature()
        image = spec.input if isinstance(spec.input, ImageInput) else None
        return cls(class_names=spec.classes, input_shape=signature.input_shape, dtype=signature.dtype, image=image)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LabelSchema:
        image = raw.get("image")
        return cls(
            class_names=tuple(raw["class_names"]), input_shape=tuple(raw["input_shape"]),
            dtype=raw.get("dtype", "float32"), image=None if image is None else ImageInput.model_validate(image),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "class_names": list(self.class_names), "input_shape": list(self.input_shape), "dtype": self.dtype,
        }  # fmt: skip
        if self.image is not None:
            out["image"] = self.image.model_dump(mode="json")
        return out


@dataclass(frozen=True)
class Rows:
    """Labelled rows in memory: ids, class names, and inputs (tensors, or image files as sent)."""

    ids: tuple[str, ...]
    labels: tuple[str, ...]
    inputs: Sequence[Input]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Originals:
    """The data a model was first trained on, split once into training and validation rows.

    `validation` is None when the split's validation side is frozen as a version already (an
    imported data set): only the training side is needed to compile."""

    name: str
    split_id: str
    seed: int
    train: Rows
    validation: Rows | None


def bundled_originals(
    model_name: str, split_path: Path, *, seed: int = 0, train: Sequence[int] | None = None
) -> Originals | None:
    """The original data a built-in model ships with, split once at `split_path`; None if it has none."""
    bundled = builtin.bundled_originals(model_name, split_path, seed=seed, train=train)
    if bundled is None:
        return None
    return Originals(
        name=bundled.name,
        split_id=bundled.split_id,
        seed=bundled.seed,
        train=Rows(bundled.train_ids, bundled.train_labels, list(bundled.train_inputs)),
        validation=Rows(bundled.validation_ids, bundled.validation_labels, list(bundled.validation_inputs)),
    )


def originals_for(conn: psycopg.Connection, model_name: str, split_path: Path) -> Originals | None:
    """A model's original data: bundled with a built-in model, else the version `import_originals`
    recorded; None for a model that came without data (its reviewers' verdicts are its data)."""
    bundled = bundled_originals(model_name, split_path)
    if bundled is not None:
        return bundled
    imported = dataset_store.list_versions(conn=conn, model_name=model_name, kind=Kind.ORIGINAL)
    if not imported:
        return None
    version = imported[-1]
    loaded = read_version(version.uri)
    source = version.manifest["source"]
    return Originals(
        name=str(source["name"]),
        split_id=str(source["split_id"]),
        seed=int(source["seed"]),
        train=Rows(tuple(loaded.item_ids), loaded.label_names, loaded.raw),
        validation=None,
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
    inputs: list[Input] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, other: _Chunk, i: int) -> None:
        self.ids.append(other.ids[i])
        self.sources.append(other.sources[i])
        self.labels.append(other.labels[i])
        self.revisions.append(other.revisions[i])
        self.inputs.append(other.inputs[i])

    def extend(self, other: _Chunk) -> None:
        for i in range(len(other)):
            self.append(other, i)


def _schema(schema: LabelSchema) -> pa.Schema:
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
        self.schema = _schema(schema)
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


# -- reading --------------------------------------------------------------------------------------


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


# -- validation versions --------------------------------------------------------------------------


def _original_rows(rows: Rows) -> Iterator[_Chunk]:
    order = sorted(range(len(rows)), key=lambda i: rows.ids[i])
    for start in range(0, len(order), CHUNK):
        chunk = _Chunk()
        for i in order[start : start + CHUNK]:
            chunk.ids.append(rows.ids[i])
            chunk.sources.append("original")
            chunk.labels.append(rows.labels[i])
            chunk.revisions.append(None)
            chunk.inputs.append(rows.inputs[i])
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
    if originals.validation is None:
        raise Invalid(f"{model_name}'s original data comes without a validation side to freeze")
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
        _original_rows(originals.validation),
        schema=schema,
        manifest=manifest,
        root_url=root_url,
        progress=None,
    )
    logger.info("froze validation version %s (%d rows)", written.id, written.rows)
    return _record(conn, written, Kind.VALIDATION, model_name, actor=actor)


def freeze_validation_from_verdicts(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    root_url: str,
    seed: int = 0,
    fraction: float = VALIDATION_FRACTION,
    actor: User | None = None,
) -> DatasetVersion:
    """The validation version of a model that came without data, drawn once from its judged items.

    Stratified by current label and seeded: of each class's judged items (in id order, permuted
    by `seed`), `max(MIN_VALIDATION_PER_CLASS, round(fraction * n))` are held out; every class
    needs MIN_JUDGED_PER_CLASS judged items, so at least three of each are left to train on. The
    held-out items never enter a training version (`compile_training` leaves validation items
    and equal inputs out). Like any validation version it is frozen: later verdicts change it
    only through a fix, which makes a new version."""
    current = dataset_store.current_validation(conn=conn, model_name=model_name)
    if current is not None:
        return current
    if not conn.autocommit:
        raise ValueError("freeze_validation_from_verdicts needs a connection in autocommit mode")
    watermark = dataset_store.settled_watermark(conn=conn)
    skipped: Counter[str] = Counter()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        judged = _Chunk()
        for chunk in _chunks(
            _labelled(conn, model_name, watermark), schema=schema, held_ids=set(), held_inputs=set(), skipped=skipped
        ):
            judged.extend(chunk)
    by_class: dict[str, list[int]] = {name: [] for name in schema.class_names}
    for i, label in enumerate(judged.labels):
        by_class[label].append(i)
    short = {name: len(rows) for name, rows in by_class.items() if len(rows) < MIN_JUDGED_PER_CLASS}
    if short:
        counts = ", ".join(f"{name!r} has {n}" for name, n in short.items())
        raise Conflict(
            f"{model_name} has no validation version and too few judged items to draw one from verdicts "
            f"({counts}; at least {MIN_JUDGED_PER_CLASS} of each class): judge more of its predictions, "
            f"or import its original data with `loop datasets import {model_name} DIR`"
        )
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for rows in by_class.values():
        held = max(MIN_VALIDATION_PER_CLASS, round(fraction * len(rows)))
        chosen.extend(rows[i] for i in rng.permutation(len(rows))[:held])
    chosen.sort(key=lambda i: judged.ids[i])
    held_out = _Chunk()
    for i in chosen:
        held_out.append(judged, i)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.VALIDATION.value,
        "model_name": model_name,
        "label_schema": schema.to_dict(),
        "source": {
            "verdicts": {
                "watermark": watermark,
                "seed": seed,
                "fraction": fraction,
                "min_per_class": MIN_VALIDATION_PER_CLASS,
                "judged": len(judged),
            },
        },
        "parent_id": None,
        "fixes": [],
        "code_version": code_version(),
    }
    written = _write_version([held_out], schema=schema, manifest=manifest, root_url=root_url, progress=None)
    logger.info("froze validation version %s from verdicts: %d of %d judged items", written.id, written.rows,
                len(judged))  # fmt: skip
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
        raise Conflict(f"{model_name} has no validation version yet; compile a training version first")
    if not fixes:
        raise Invalid("no label fixes given")
    loaded = read_version(parent.uri)
    labels = [schema.class_names[i] for i in loaded.labels]
    position = {item: i for i, item in enumerate(loaded.item_ids)}
    for fix in fixes:
        if fix.item_id not in position:
            raise NotFound(f"{fix.item_id!r} is not in validation version {parent.id}")
        if fix.label not in schema.class_names:
            raise Invalid(f"label {fix.label!r} is not one of {', '.join(schema.class_names)}")
        if not fix.reason.strip():
            raise Invalid(f"a reason is required for the fix of {fix.item_id}")
        if labels[position[fix.item_id]] == fix.label:
            raise Conflict(f"{fix.item_id} is already labelled {fix.label!r}")
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
        _original_rows(Rows(tuple(loaded.item_ids), tuple(labels), loaded.raw)),
        schema=schema,
        manifest=manifest,
        root_url=root_url,
        progress=None,
    )
    logger.info("validation version %s replaces %s (%d fixes)", written.id, parent.id, len(fixes))
    return _record(conn, written, Kind.VALIDATION, model_name, actor=actor, parent_id=parent.id)


# -- training versions ----------------------------------------------------------------------------


def input_key(value: Input) -> bytes:
    """Identity of an input's content: the same pixels (or image bytes) give the same key whatever their source."""
    data = value.data if isinstance(value, Blob) else np.ascontiguousarray(value, dtype=np.float32).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


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
    unreviewed, when its input was erased or is not the model's kind (a tensor of its shape, or an
    image in one of its formats), or equals a validation input. Only the items of `model_name` (and
    samples reviewers added for it) are read.
    """
    if not conn.autocommit:
        raise ValueError("compile_training needs a connection in autocommit mode (it opens its own transactions)")
    settled = dataset_store.settled_watermark(conn=conn)
    if watermark is None:
        watermark = settled
    elif watermark < 0:
        raise Invalid(f"watermark {watermark} is not an annotation revision")
    elif watermark > settled:  # a revision to come, or one not settled yet: the state, not the request
        raise Conflict(f"watermark {watermark} is not a settled annotation revision (0..{settled})")
    if validation.kind is not Kind.VALIDATION:
        raise Invalid(f"{validation.id} is a {validation.kind.value} version, not a validation version")
    held_out = read_version(validation.uri)
    held_out_ids = set(held_out.item_ids)
    held_out_inputs = {input_key(x) for x in held_out.raw}
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
                "inputs of another shape or kind",
                "labels outside the label schema",
                "validation items and any input equal to a validation input",
            ],
            "original": None if originals is None else {"name": originals.name, "split_id": originals.split_id},
        },
        "code_version": code_version(),
    }
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        expected = dataset_store.count_labelled(conn=conn, model_name=model_name, watermark=watermark)
        if originals is not None:
            expected += len(originals.train)
        sources: list[Iterator[_Row]] = [_labelled(conn, model_name, watermark)]
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


def _labelled(conn: psycopg.Connection, model_name: str, watermark: int) -> Iterator[_Row]:
    for item in dataset_store.labelled_items(conn=conn, model_name=model_name, watermark=watermark):
        yield str(item.id), item.source, item.label, item.revision, None, item.input, item.input_type


def _original(originals: Originals) -> Iterator[_Row]:
    rows = originals.train
    for i in sorted(range(len(rows)), key=lambda i: rows.ids[i]):
        yield rows.ids[i], "original", rows.labels[i], None, rows.inputs[i], None, None


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
    accepted = set() if schema.image is None else {images.MEDIA_TYPES[f] for f in schema.image.formats}
    chunk = _Chunk()
    for item_id, source, label, revision, given, stored, media_type in rows:
        if label not in classes:
            skipped["label outside the schema"] += 1
            continue
        value: Input | None = given
        if value is None and schema.image is None:
            value = None if media_type is not None else decoder.decode(stored or b"")
        elif value is None:
            value = Blob(stored, media_type) if stored and media_type in accepted else None
        if value is None:
            skipped["input of another shape or kind"] += 1
            continue
        if item_id in held_ids or input_key(value) in held_inputs:
            skipped["validation item or equal to one"] += 1
            continue
        chunk.ids.append(item_id)
        chunk.sources.append(source)
        chunk.labels.append(label)
        chunk.revisions.append(revision)
        chunk.inputs.append(value)
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


# -- original data --------------------------------------------------------------------------------


def read_original(source: Path, schema: LabelSchema, *, progress: Progress | None = None) -> Rows:
    """A model's original data as rows: an image folder (one sub-folder per class, images kept as
    files) for an image model, or an `.npz` of `inputs` and `labels` for a tensor model.

    Raises `Invalid` naming what is wrong: unknown classes, unreadable files, wrong shapes."""
    if schema.image is not None:
        if not source.is_dir():
            raise Invalid(f"{source} is not a folder: an image model's data is one sub-folder of images per class")
        return _read_image_folder(source, schema, schema.image, progress)
    if source.is_dir() or source.suffix != ".npz":
        raise Invalid(f"{source}: a tensor model's data is an .npz file of `inputs` and `labels`")
    return _read_npz(source, schema)


def _read_image_folder(source: Path, schema: LabelSchema, image: ImageInput, progress: Progress | None) -> Rows:
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in schema.class_names]
    if unknown:
        raise Invalid(
            f"{source}: no class of the model is called {', '.join(repr(u) for u in unknown)}"
            f" (classes: {', '.join(schema.class_names)})"
        )
    files = [
        (folder.name, path)
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    ids: list[str] = []
    labels: list[str] = []
    blobs: list[Blob] = []
    problems: list[str] = []
    for n, (label, path) in enumerate(files, start=1):
        relative = path.relative_to(source).as_posix()
        try:
            data = path.read_bytes()
            decoded = images.decode(data, image)
        except (OSError, images.ImageError) as exc:
            problems.append(f"{relative}: {exc.strerror if isinstance(exc, OSError) else exc}")
            continue
        ids.append(f"original:{relative}")
        labels.append(label)
        blobs.append(Blob(data, decoded.media_type))
        if progress is not None:
            progress(n, len(files))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise Invalid(f"{len(problems)} of {len(files)} files cannot be read as images: {shown}")
    return Rows(tuple(ids), tuple(labels), blobs)


def _read_npz(source: Path, schema: LabelSchema) -> Rows:
    try:
        with np.load(source, allow_pickle=False) as archive:
            missing = {"inputs", "labels"} - set(archive.files)
            if missing:
                raise Invalid(
                    f"{source} has no {' or '.join(sorted(missing))} array (it has: {', '.join(archive.files)})"
                )
            inputs, labels = archive["inputs"], archive["labels"]
    except (OSError, ValueError) as exc:
        raise Invalid(f"{source} cannot be read as an .npz file: {exc}") from None
    if inputs.shape[1:] != schema.input_shape or not np.issubdtype(inputs.dtype, np.number):
        raise Invalid(f"inputs are {inputs.dtype} of shape {list(inputs.shape)}; the model takes numbers of shape "
                      f"[N, {', '.join(map(str, schema.input_shape))}]")  # fmt: skip
    if labels.shape != (len(inputs),):
        raise Invalid(f"labels have shape {list(labels.shape)}; one label per input needs [{len(inputs)}]")
    if np.issubdtype(labels.dtype, np.integer):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(schema.class_names)):
            raise Invalid(f"label indices must be in 0..{len(schema.class_names) - 1}")
        names = [schema.class_names[int(i)] for i in labels]
    elif labels.dtype.kind == "U":
        names = [str(x) for x in labels]
        unknown = sorted(set(names) - set(schema.class_names))
        if unknown:
            raise Invalid(f"labels {', '.join(map(repr, unknown[:5]))} are not classes of the model "
                          f"(classes: {', '.join(schema.class_names)})")  # fmt: skip
    else:
        raise Invalid(f"labels are {labels.dtype}; give class names (strings) or indices (integers)")
    tensors = inputs.astype(np.float32)
    if not np.isfinite(tensors).all():
        raise Invalid("inputs contain NaN or infinite values")
    return Rows(tuple(f"original:{i:07d}" for i in range(len(tensors))), tuple(names), list(tensors))


def split_originals(
    rows: Rows, schema: LabelSchema, *, name: str, seed: int = 0, validation_fraction: float = 0.2
) -> Originals:
    """A stratified, seeded split of imported rows; every class needs MIN_PER_CLASS samples."""
    from sklearn.model_selection import train_test_split

    counts = Counter(rows.labels)
    few = [f"{c!r} has {counts.get(c, 0)}" for c in schema.class_names if counts.get(c, 0) < MIN_PER_CLASS]
    if few:
        raise Invalid(
            f"too few samples to hold out a validation split of every class (at least {MIN_PER_CLASS} each): "
            + ", ".join(few)
        )
    order = sorted(range(len(rows)), key=lambda i: rows.ids[i])
    train_idx, val_idx = train_test_split(
        np.asarray(order), test_size=validation_fraction, random_state=seed, stratify=[rows.labels[i] for i in order]
    )
    digest = hashlib.blake2b(digest_size=8)
    for i in sorted(val_idx, key=lambda i: rows.ids[i]):
        digest.update(rows.ids[i].encode() + b"\0" + input_key(rows.inputs[i]))

    def take(indices: Iterable[int]) -> Rows:
        chosen = sorted(indices, key=lambda i: rows.ids[i])
        return Rows(tuple(rows.ids[i] for i in chosen), tuple(rows.labels[i] for i in chosen),
                    [rows.inputs[i] for i in chosen])  # fmt: skip

    return Originals(name=name, split_id=f"val-{digest.hexdigest()}", seed=seed, train=take(train_idx),
                     validation=take(val_idx))  # fmt: skip


@dataclass(frozen=True)
class Imported:
    original: DatasetVersion
    validation: DatasetVersion


def import_originals(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    source: Path,
    root_url: str,
    seed: int = 0,
    validation_fraction: float = 0.2,
    actor: User | None = None,
    progress: Progress | None = None,
) -> Imported:
    """Import a model's original data once: its training side as an `original` version, its
    validation side frozen as the model's validation version."""
    if dataset_store.current_validation(conn=conn, model_name=model_name) is not None:
        raise Invalid(f"{model_name} has a frozen validation version already; its original data is imported once")
    if builtin.has_bundled_originals(model_name):
        raise Invalid(f"{model_name} is built in: its original data ships with it")
    rows = read_original(source, schema, progress=progress)
    originals = split_originals(rows, schema, name=source.name, seed=seed, validation_fraction=validation_fraction)
    assert originals.validation is not None
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.ORIGINAL.value,
        "model_name": model_name,
        "label_schema": schema.to_dict(),
        "source": {"name": originals.name, "split_id": originals.split_id, "seed": seed,
                   "validation_fraction": validation_fraction, "validation_rows": len(originals.validation)},
        "code_version": code_version(),
    }  # fmt: skip
    written = _write_version(
        _original_rows(originals.train), schema=schema, manifest=manifest, root_url=root_url, progress=None
    )
    original = _record(conn, written, Kind.ORIGINAL, model_name, actor=actor)
    validation = freeze_validation(
        conn=conn, model_name=model_name, originals=originals, schema=schema, root_url=root_url, actor=actor
    )
    logger.info("imported %s's original data: %d training rows (%s), %d validation rows (%s)",
                model_name, original.rows, original.id, validation.rows, validation.id)  # fmt: skip
    return Imported(original=original, validation=validation)
