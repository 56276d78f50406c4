"""A model's own original data: imported once, split and frozen; image versions as files, hashed by DVC."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import psycopg
import pytest
from PIL import Image

from feedback import review as rs
from feedback.datasets import (
    Kind,
    LabelSchema,
    compile_training,
    dir_hash,
    image_file,
    import_originals,
    originals_for,
    read_version,
)
from feedback.datasets import store as dataset_store
from feedback.errors import Invalid
from models import shapes
from models.spec import ModelSpec, TensorInput

pytestmark = pytest.mark.data

SCHEMA = LabelSchema.of(shapes.spec())
PER_CLASS = 10
MODEL = "shapes-test"


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    shapes.write(folder, per_class=PER_CLASS, seed=1)
    return folder


@pytest.fixture
def admin(conn: psycopg.Connection) -> rs.User:
    return rs.create_user(conn=conn, name="admin", role=rs.Role.ADMIN)[0]


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def test_the_shapes_data_is_the_same_bytes_from_the_same_seed(tmp_path: Path) -> None:
    shapes.write(tmp_path / "a", per_class=3, seed=7)
    shapes.write(tmp_path / "b", per_class=3, seed=7)
    shapes.write(tmp_path / "c", per_class=3, seed=8)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(shapes.CLASS_NAMES)
    assert dir_hash(tmp_path / "a") == dir_hash(tmp_path / "b") != dir_hash(tmp_path / "c")
    image = Image.open(tmp_path / "a" / "star" / "00000.png")
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))


def test_an_image_folder_is_imported_split_and_frozen_as_files_dvc_hashes(
    conn: psycopg.Connection, shapes_dir: Path, tmp_path: Path, admin: rs.User
) -> None:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    root = str(tmp_path / "ds")
    imported = import_originals(conn=conn, model_name=MODEL, schema=SCHEMA, source=shapes_dir, root_url=root,
                                actor=admin)  # fmt: skip
    original, validation = imported.original, imported.validation
    assert (original.kind, validation.kind) == (Kind.ORIGINAL, Kind.VALIDATION)
    total = PER_CLASS * len(shapes.CLASS_NAMES)
    assert original.rows + validation.rows == total
    assert validation.per_class == dict.fromkeys(shapes.CLASS_NAMES, 2)  # stratified: 20% of 10 of each
    assert dataset_store.current_validation(conn=conn, model_name=MODEL) == validation

    loaded = read_version(validation.uri)
    for item, blob in zip(loaded.item_ids, loaded.raw, strict=True):
        relative = item.removeprefix("original:")
        assert (shapes_dir / relative).read_bytes() == (
            Path(validation.uri) / image_file(item, "image/png")
        ).read_bytes()
        assert getattr(blob, "media_type", None) == "image/png"
    assert loaded.inputs.shape == (validation.rows, 3, 64, 64)
    assert loaded.inputs.min() >= -2.0 and loaded.inputs.max() <= 2.0

    fs = LocalFileSystem()  # type: ignore[no-untyped-call]
    for version in (original, validation):
        files = sorted(p.relative_to(version.uri).as_posix() for p in Path(version.uri).rglob("*.png"))
        assert len(files) == version.rows
        odb = HashFileDB(fs, str(tmp_path / "dvc-cache"))
        _, _, obj = build(odb, version.uri, fs, "md5", dry_run=True)
        assert obj.hash_info.value == f"{version.id}.dir"

    with pytest.raises(Invalid, match="imported once"):
        import_originals(conn=conn, model_name=MODEL, schema=SCHEMA, source=shapes_dir, root_url=root)


def test_reviewed_images_go_into_a_training_version_as_sent_and_erased_ones_stay_out(
    conn: psycopg.Connection, shapes_dir: Path, tmp_path: Path, admin: rs.User
) -> None:
    root = str(tmp_path / "ds")
    imported = import_originals(conn=conn, model_name=MODEL, schema=SCHEMA, source=shapes_dir, root_url=root)
    red, blue, green = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))
    kept = rs.add_sample(conn=conn, user=admin, model_name=MODEL, input=red, input_type="image/png", label="circle",
                         reason=None).prediction_id  # fmt: skip
    erased = rs.add_sample(conn=conn, user=admin, model_name=MODEL, input=blue, input_type="image/png",
                           label="star", reason=None).prediction_id  # fmt: skip
    rs.erase_input(conn=conn, user=admin, prediction_id=erased, reason="the sender asked")
    # Another model's sample and a tensor sample are not this model's inputs.
    rs.add_sample(conn=conn, user=admin, model_name="other", input=green, input_type="image/png", label="star",
                  reason=None)  # fmt: skip
    rs.add_sample(conn=conn, user=admin, model_name=MODEL, input=np.zeros((3,), np.float32).tobytes(), label="star",
                  reason=None)  # fmt: skip

    originals = originals_for(conn, MODEL, tmp_path / "unused-split.json")
    assert originals is not None and originals.validation is None and len(originals.train) == imported.original.rows
    version = compile_training(conn=conn, model_name=MODEL, schema=SCHEMA, originals=originals,
                               validation=imported.validation, root_url=root)  # fmt: skip
    loaded = read_version(version.uri)
    assert version.rows == imported.original.rows + 1
    assert str(kept) in loaded.item_ids and str(erased) not in loaded.item_ids
    assert (Path(version.uri) / image_file(str(kept), "image/png")).read_bytes() == red
    assert version.manifest["skipped"] == {"input of another shape or kind": 1}
    assert dir_hash(Path(version.uri)) == version.id
    # The original rows are the same files as in the original version: DVC stores them once.
    some = next(i for i in loaded.item_ids if i.startswith("original:"))
    assert (Path(version.uri) / image_file(some, "image/png")).read_bytes() == (
        Path(imported.original.uri) / image_file(some, "image/png")
    ).read_bytes()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "hexagon").mkdir(), "no class of the model is called 'hexagon'"),
        (
            lambda d: (d / "star" / "notes.txt").write_text("hello"),
            "1 of 51 files cannot be read as images: star/notes.txt",
        ),
        (lambda d: [p.unlink() for p in sorted((d / "cross").iterdir())[2:]], "'cross' has 2"),
        (lambda d: shutil.rmtree(d / "circle"), "'circle' has 0"),
        (lambda d: (d / "square" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "square/00001.png"),
    ],
)
def test_bad_original_data_is_refused_and_nothing_is_recorded(
    conn: psycopg.Connection, shapes_dir: Path, tmp_path: Path, damage: object, message: str
) -> None:
    source = tmp_path / "data"
    shutil.copytree(shapes_dir, source)
    damage(source)  # type: ignore[operator]
    with pytest.raises(Invalid, match=message.replace("(", r"\(")):
        import_originals(conn=conn, model_name=MODEL, schema=SCHEMA, source=source, root_url=str(tmp_path / "ds"))
    assert dataset_store.list_versions(conn=conn, model_name=MODEL) == []


def test_a_tensor_models_original_data_is_an_npz(conn: psycopg.Connection, tmp_path: Path) -> None:
    spec = ModelSpec(input=TensorInput(shape=(4,), min_value=0, max_value=1), classes=("a", "b"))
    schema = LabelSchema.of(spec)
    rng = np.random.default_rng(0)
    inputs = rng.uniform(0, 1, size=(20, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", inputs=inputs, labels=np.array(["a", "b"] * 10))
    imported = import_originals(conn=conn, model_name="t", schema=schema, source=tmp_path / "data.npz",
                                root_url=str(tmp_path / "ds"))  # fmt: skip
    assert (imported.original.rows, imported.validation.rows) == (16, 4)
    both = np.concatenate([read_version(imported.original.uri).inputs, read_version(imported.validation.uri).inputs])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, inputs.tolist()))

    np.savez(tmp_path / "bad.npz", inputs=inputs[:, :3], labels=np.zeros(20, dtype=np.int64))
    with pytest.raises(Invalid, match=r"of shape \[20, 3\]; the model takes numbers of shape \[N, 4\]"):
        import_originals(conn=conn, model_name="t2", schema=schema, source=tmp_path / "bad.npz", root_url="x")
    np.savez(tmp_path / "labels.npz", inputs=inputs, labels=np.array(["a", "c"] * 10))
    with pytest.raises(Invalid, match="labels 'c' are not classes"):
        import_originals(conn=conn, model_name="t2", schema=schema, source=tmp_path / "labels.npz", root_url="x")
    with pytest.raises(Invalid, match=r"a tensor model's data is an \.npz"):
        import_originals(conn=conn, model_name="t2", schema=schema, source=tmp_path, root_url="x")
