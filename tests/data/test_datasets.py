"""Dataset versions compiled from a real Postgres: ids, immutability, watermarks, hold-outs."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import NDArray

from feedback import review as rs
from feedback.datasets import (
    LabelFix,
    LabelSchema,
    Originals,
    Rows,
    bundled_originals,
    compile_training,
    dir_hash,
    fix_validation,
    freeze_validation,
    read_version,
    verify,
)
from feedback.datasets import store as dataset_store
from models import builtin, digits
from models.npy import npy_bytes

pytestmark = pytest.mark.data

SCHEMA = LabelSchema(class_names=digits.CLASS_NAMES, input_shape=digits.INPUT_SHAPE)


@pytest.fixture
def originals(split_path: Path) -> Originals:
    found = bundled_originals(builtin.DEFAULT_MODEL_NAME, split_path)
    assert found is not None
    return found


@pytest.fixture
def admin(conn: psycopg.Connection) -> rs.User:
    return rs.create_user(conn=conn, name="admin", role=rs.Role.ADMIN)[0]


def held(originals: Originals) -> Rows:
    """The validation side of bundled data (always there)."""
    assert originals.validation is not None
    return originals.validation


def pixels(seed: int) -> NDArray[np.float32]:
    return np.random.default_rng(seed).integers(0, 17, size=digits.INPUT_SHAPE).astype(np.float32)


def add(conn: psycopg.Connection, user: rs.User, seed: int, label: str) -> uuid.UUID:
    state = rs.add_sample(conn=conn, user=user, model_name="m", input=npy_bytes(pixels(seed)), label=label, reason=None)
    return state.prediction_id


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_ids_are_dvc_directory_hashes(
    conn: psycopg.Connection, admin: rs.User, originals: Originals, tmp_path: Path
) -> None:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    add(conn, admin, 1, "3")
    validation = freeze_validation(
        conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=str(tmp_path / "ds")
    )
    version = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation,
        root_url=str(tmp_path / "ds"),
    )  # fmt: skip
    fs = LocalFileSystem()  # type: ignore[no-untyped-call]
    for v in (validation, version):
        odb = HashFileDB(fs, str(tmp_path / "dvc-cache"))
        _, _, obj = build(odb, v.uri, fs, "md5", dry_run=True)
        assert obj.hash_info.value == f"{v.id}.dir"
        assert dir_hash(Path(v.uri)) == v.id


def test_same_watermark_same_bytes_and_old_versions_never_change(
    conn: psycopg.Connection, admin: rs.User, originals: Originals, tmp_path: Path
) -> None:
    root = str(tmp_path / "ds")
    validation = freeze_validation(conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=root)
    for i in range(30):
        add(conn, admin, i, str(i % 10))
    first = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation, root_url=root
    )
    before = files_of(Path(first.uri))

    again = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation,
        root_url=str(tmp_path / "elsewhere"),
    )  # fmt: skip
    assert again.id == first.id
    assert files_of(Path(again.uri)) == before

    # Relabel one item and add another: a new version; the old one, compiled again at its
    # watermark, still gives the same id and bytes.
    relabelled = add(conn, admin, 100, "1")
    rs.resolve(conn=conn, user=admin, prediction_id=relabelled, label="7", reason="looked again")
    add(conn, admin, 101, "2")
    second = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation, root_url=root
    )
    assert second.id != first.id
    assert second.rows == first.rows + 2
    assert files_of(Path(first.uri)) == before
    verify(first.uri, first.id)

    assert first.watermark is not None
    replay = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation,
        root_url=str(tmp_path / "replay"), watermark=first.watermark,
    )  # fmt: skip
    assert replay.id == first.id

    # At the watermark between the two annotations of `relabelled`, its label is the first one.
    history = rs.history(conn=conn, prediction_id=relabelled)
    middle = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation,
        root_url=str(tmp_path / "middle"), watermark=history[0]["revision"],
    )  # fmt: skip
    loaded = read_version(middle.uri)
    assert loaded.labels[loaded.item_ids.index(str(relabelled))] == 1
    latest = read_version(second.uri)
    assert latest.labels[latest.item_ids.index(str(relabelled))] == 7


def test_rows_are_sorted_and_labelled_as_the_review_says(
    conn: psycopg.Connection, admin: rs.User, originals: Originals, tmp_path: Path, database_url: str
) -> None:
    root = str(tmp_path / "ds")
    validation = freeze_validation(conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=root)
    kept = add(conn, admin, 1, "4")
    discarded = add(conn, admin, 2, "5")
    rs.resolve(conn=conn, user=admin, prediction_id=discarded, label=None, reason="not a digit")
    erased = add(conn, admin, 3, "6")
    rs.erase_input(conn=conn, user=admin, prediction_id=erased, reason="removal request")
    # A sample equal to a validation input must stay out, whatever its label and source.
    leak = rs.add_sample(
        conn=conn,
        user=admin,
        model_name="m",
        input=npy_bytes(np.asarray(held(originals).inputs[0])),
        label="0",
        reason=None,
    ).prediction_id

    version = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation, root_url=root,
        actor=admin,
    )  # fmt: skip
    loaded = read_version(version.uri)
    assert loaded.item_ids == sorted(loaded.item_ids)
    ids = set(loaded.item_ids)
    assert str(kept) in ids
    assert not ids & {str(discarded), str(erased), str(leak)}
    assert not ids & set(held(originals).ids)
    assert set(originals.train.ids) - {i for i in ids if i.startswith("digits:")} == {
        item
        for item, x in zip(originals.train.ids, originals.train.inputs, strict=True)
        if any(np.array_equal(np.asarray(x), np.asarray(v)) for v in held(originals).inputs)
    }  # only original rows equal to a validation input are held out
    row = loaded.item_ids.index(str(kept))
    assert loaded.labels[row] == 4
    np.testing.assert_array_equal(loaded.inputs[row], pixels(1))
    assert version.manifest["watermark"] == version.watermark
    assert version.manifest["validation_id"] == validation.id
    assert sum(version.per_class.values()) == version.rows == len(loaded.item_ids)
    assert version.manifest["skipped"]["validation item or equal to one"] >= 1

    part = pq.read_table(Path(version.uri) / version.manifest["files"][0])
    assert part.column_names == ["item_id", "source", "label", "label_index", "revision", "input"]
    with psycopg.connect(database_url) as c:
        stored = dataset_store.get_version(conn=c, version_id=version.id)
    assert stored is not None
    assert (stored.rows, stored.created_by, stored.watermark) == (version.rows, admin.name, version.watermark)


def test_validation_fix_makes_a_new_version_and_leaves_the_frozen_one(
    conn: psycopg.Connection, admin: rs.User, originals: Originals, tmp_path: Path
) -> None:
    root = str(tmp_path / "ds")
    frozen = freeze_validation(conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=root)
    assert freeze_validation(conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=root) == frozen
    before = files_of(Path(frozen.uri))
    item = held(originals).ids[5]
    old_label = held(originals).labels[5]
    new_label = "9" if old_label != "9" else "8"

    for bad, refusal, message in [
        (LabelFix("digits:99999", "1", "typo"), rs.NotFound, "is not in validation version"),
        (LabelFix(item, "eleven", "typo"), rs.Invalid, "is not one of"),
        (LabelFix(item, old_label, "typo"), rs.Conflict, "is already labelled"),
        (LabelFix(item, new_label, " "), rs.Invalid, "a reason is required"),
    ]:
        with pytest.raises(refusal, match=message):
            fix_validation(conn=conn, model_name="m", fixes=[bad], schema=SCHEMA, root_url=root, actor=admin)
    assert dataset_store.current_validation(conn=conn, model_name="m") == frozen

    fixed = fix_validation(
        conn=conn, model_name="m", fixes=[LabelFix(item, new_label, "ink smudge")], schema=SCHEMA, root_url=root,
        actor=admin,
    )  # fmt: skip
    assert fixed.id != frozen.id and fixed.parent_id == frozen.id
    assert files_of(Path(frozen.uri)) == before
    assert dataset_store.current_validation(conn=conn, model_name="m") == fixed
    loaded = read_version(fixed.uri)
    assert SCHEMA.class_names[loaded.labels[loaded.item_ids.index(item)]] == new_label
    assert fixed.manifest["fixes"] == [{"item_id": item, "label": new_label}]


def test_any_fsspec_url_gives_the_same_version(
    conn: psycopg.Connection, admin: rs.User, originals: Originals, tmp_path: Path
) -> None:
    validation = freeze_validation(
        conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=str(tmp_path / "ds")
    )
    add(conn, admin, 7, "7")
    local = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation,
        root_url=str(tmp_path / "ds"),
    )  # fmt: skip
    url = f"memory://loop-test-{uuid.uuid4().hex}"
    remote = compile_training(
        conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation, root_url=url
    )
    assert remote.id == local.id  # one id, one registration: the first location is kept
    copy = f"{url}/{remote.id}"
    verify(copy, remote.id)
    assert read_version(copy).item_ids == read_version(local.uri).item_ids


def test_a_watermark_beyond_the_settled_revisions_is_refused(
    conn: psycopg.Connection, admin: rs.User, originals: Originals, tmp_path: Path
) -> None:
    root = str(tmp_path / "ds")
    validation = freeze_validation(conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=root)
    add(conn, admin, 1, "1")
    with pytest.raises(rs.Conflict, match="not a settled annotation revision"):
        compile_training(
            conn=conn, model_name="m", schema=SCHEMA, originals=originals, validation=validation, root_url=root,
            watermark=10_000,
        )  # fmt: skip
    with pytest.raises(rs.Conflict, match="no rows"):
        compile_training(
            conn=conn, model_name="m", schema=SCHEMA, originals=None, validation=validation, root_url=root,
            watermark=0,
        )  # fmt: skip
    assert list((tmp_path / "ds").glob(".compiling-*")) == []


def test_concurrent_compiles_of_the_same_labels_publish_one_version(
    database_url: str,
    conn: psycopg.Connection,
    admin: rs.User,
    originals: Originals,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = str(tmp_path / "ds")
    validation = freeze_validation(conn=conn, model_name="m", originals=originals, schema=SCHEMA, root_url=root)
    add(conn, admin, 1, "1")
    # Both compiles look for the version before either publishes it: both find it absent.
    both_looked = threading.Barrier(2, timeout=30)
    original = LocalFileSystem.exists

    def look_then_wait(self: LocalFileSystem, path: str, **kwargs: object) -> bool:
        found: bool = original(self, path, **kwargs)
        both_looked.wait()
        return found

    monkeypatch.setattr(LocalFileSystem, "exists", look_then_wait)
    ids: list[str] = []
    errors: list[BaseException] = []

    def compile_once() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as own:
                version = compile_training(
                    conn=own, model_name="m", schema=SCHEMA, originals=originals, validation=validation,
                    root_url=root,
                )  # fmt: skip
            ids.append(version.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=compile_once) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 2 and len(set(ids)) == 1
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted({ids[0], validation.id})
