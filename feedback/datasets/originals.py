"""A model's original data: bundled with a built-in model, or imported once from a folder of
images (one sub-folder per class) or an `.npz` of inputs and labels, split once (stratified,
seeded) into its training side, kept as an `original` version, and its validation side, frozen
as the model's validation version.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from feedback.datasets import store
from feedback.datasets.schema import Blob, LabelSchema, Originals, Progress, Rows, input_key
from feedback.datasets.store import DatasetVersion, Kind
from feedback.datasets.validation import freeze_validation
from feedback.datasets.versions import FORMAT, chunks_of, read_version, record, write_version
from feedback.errors import Invalid
from feedback.review.users import User
from models import builtin, images
from models.provenance import code_version
from models.spec import ImageInput

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 5  # an imported class needs this many samples for the split to hold out one of each


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
    imported = store.list_versions(conn=conn, model_name=model_name, kind=Kind.ORIGINAL)
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
        raise Invalid(
            f"inputs are {inputs.dtype} of shape {list(inputs.shape)}; the model takes numbers of shape "
            f"[N, {', '.join(map(str, schema.input_shape))}]"
        )
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
            raise Invalid(
                f"labels {', '.join(map(repr, unknown[:5]))} are not classes of the model "
                f"(classes: {', '.join(schema.class_names)})"
            )
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
        return Rows(
            tuple(rows.ids[i] for i in chosen), tuple(rows.labels[i] for i in chosen), [rows.inputs[i] for i in chosen]
        )

    return Originals(
        name=name, split_id=f"val-{digest.hexdigest()}", seed=seed, train=take(train_idx), validation=take(val_idx)
    )


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
    if store.current_validation(conn=conn, model_name=model_name) is not None:
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
        "source": {
            "name": originals.name,
            "split_id": originals.split_id,
            "seed": seed,
            "validation_fraction": validation_fraction,
            "validation_rows": len(originals.validation),
        },
        "code_version": code_version(),
    }
    written = write_version(
        chunks_of(originals.train), schema=schema, manifest=manifest, root_url=root_url, progress=None
    )
    original = record(conn, written, Kind.ORIGINAL, model_name, actor=actor)
    validation = freeze_validation(
        conn=conn, model_name=model_name, originals=originals, schema=schema, root_url=root_url, actor=actor
    )
    logger.info(
        "imported %s's original data: %d training rows (%s), %d validation rows (%s)",
        model_name,
        original.rows,
        original.id,
        validation.rows,
        validation.id,
    )
    return Imported(original=original, validation=validation)
