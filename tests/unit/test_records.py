from __future__ import annotations

import uuid

import numpy as np
import pytest

from feedback.ids import uuid7, uuid7_time_ms
from feedback.predictions.log import PACK_BYTES, PACK_RECORDS, packed
from feedback.predictions.records import (
    MalformedEntry,
    PredictionRecord,
    ShadowBatch,
    ShadowRow,
    decode,
    decode_entry,
    encode,
    held,
    pack,
    unpack,
    unstorable_text,
)
from models.npy import npy_bytes
from models.npy import read_npy as npy_load

pytestmark = pytest.mark.unit


def record(**overrides: object) -> PredictionRecord:
    fields: dict[str, object] = {
        "id": uuid7(),
        "model_name": "digits-cnn",
        "model_version": "v1",
        "input": np.arange(64, dtype=np.float32).reshape(8, 8) / 4,
        "scores": np.linspace(0, 1, 10, dtype=np.float32),
        "label": "9",
        "confidence": 0.75,
        "request_id": "req-1",
        "tags": {"app": "x"},
    }
    fields.update(overrides)
    return PredictionRecord(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    original = record()
    back = decode(encode(original))
    assert back.id == original.id
    np.testing.assert_array_equal(back.input, original.input)
    assert back.input.dtype == np.float32
    np.testing.assert_array_equal(back.scores, original.scores)
    assert (back.label, back.confidence, back.request_id, back.tags) == ("9", 0.75, "req-1", {"app": "x"})
    assert back.label_index == 9


def test_created_at_is_the_ids_millisecond() -> None:
    r = record()
    assert int(r.created_at.timestamp() * 1000) == uuid7_time_ms(r.id)


def test_no_tags_means_no_field() -> None:
    assert b"g" not in encode(record(tags={}))
    assert decode(encode(record(tags={}))).tags == {}


def test_npy_bytes_match_numpy_save() -> None:
    import io

    array = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array)
    assert npy_bytes(array) == buffer.getvalue()
    np.testing.assert_array_equal(npy_load(npy_bytes(array[1])), array[1])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f.pop(b"x"), "missing fields: x"),
        (lambda f: f.update({b"id": b"nonsense"}), "not a UUID"),
        (lambda f: f.update({b"id": str(uuid.uuid4()).encode()}), "not a version 7 UUID"),
        (lambda f: f.update({b"x": b"not npy"}), r"not \.npy"),
        (lambda f: f.update({b"s": b"abc"}), "not float32"),
        (lambda f: f.update({b"c": b"high"}), "not valid"),
        (lambda f: f.update({b"c": b"nan"}), "not finite"),
        (lambda f: f.update({b"g": b"[1, 2]"}), "tags are not"),
        (lambda f: f.update({b"m": b"\xff\xfe"}), "not valid"),
    ],
)
def test_malformed_entries_say_what_is_wrong(mutate: object, reason: str) -> None:
    fields = encode(record())
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(MalformedEntry, match=reason):
        decode(fields)


def test_pickled_inputs_are_refused() -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    fields = encode(record())
    fields[b"x"] = buffer.getvalue()
    with pytest.raises(MalformedEntry, match=r"not \.npy"):
        decode(fields)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("x\x00y", "the NUL character U+0000 at position 1"),
        ("\ud800", "the lone surrogate U+D800 at position 0"),
        ("ok\udfff", "the lone surrogate U+DFFF at position 2"),
        ("plain", None),
        ("\x01\x1f\u2028 tabs\tand emoji \U0001f600", None),  # storable, if odd
    ],
)
def test_text_postgres_cannot_store_is_named(text: str, problem: str | None) -> None:
    found = unstorable_text(text)
    assert (found is None) if problem is None else (found is not None and problem in found)


def shadow_batch(n: int = 3, **overrides: object) -> ShadowBatch:
    fields: dict[str, object] = {
        "ids": [uuid7() for _ in range(n)],
        "model_name": "digits-cnn",
        "model_version": "v2",
        "scores": np.full((n, 10), 0.1, np.float32),
        "labels": ["1"] * n,
        "confidences": np.full(n, 0.1, np.float32),
        "request_ids": [f"r{i}" for i in range(n)],
        "answer_ms": np.array([1.5, 2.5, 3.5][:n], np.float32),
        "shadow_ms": 7.25,
    }
    fields.update(overrides)
    return ShadowBatch(**fields)  # type: ignore[arg-type]


def test_a_shadow_entry_carries_both_models_call_times() -> None:
    rows = [r for r in decode_entry(encode(shadow_batch())) if isinstance(r, ShadowRow)]
    assert [(r.answer_ms, r.shadow_ms) for r in rows] == [(1.5, 7.25), (2.5, 7.25), (3.5, 7.25)]
    untimed = [
        r for r in decode_entry(encode(shadow_batch(answer_ms=None, shadow_ms=None))) if isinstance(r, ShadowRow)
    ]
    assert [(r.answer_ms, r.shadow_ms) for r in untimed] == [(None, None)] * 3  # entries written before timings


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"at": b"\x00" * 8}, "answer call times do not describe"),
        ({b"st": b"soon"}, "not a number"),
        ({b"st": b"-1.0"}, "negative or not finite"),
        ({b"at": np.array([1, np.nan, 2], "<f4").tobytes()}, "negative or not finite"),
    ],
)
def test_a_shadow_entry_with_bad_call_times_is_malformed(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(MalformedEntry, match=reason):
        decode_entry(encode(shadow_batch()) | fields)


# -- packs: the entries appended in one moment, as one stream entry -----------------------------


def entries_of_one_moment() -> list[dict[bytes, bytes]]:
    image = record(tags={}, input_type="image/png", input_bytes=b"\x89PNG fake")
    return [encode(record()), encode(record(tags={})), encode(image), encode(shadow_batch()), encode(record())]


def test_a_pack_holds_its_entries_as_they_were() -> None:
    entries = entries_of_one_moment()
    packed_entry = pack(entries)
    assert held(packed_entry) == 5 and held(entries[0]) == 1
    assert unpack(packed_entry) == entries  # fields absent from some (tags, media type) stay absent
    assert unpack(entries[0]) == [entries[0]]
    assert [len(decode_entry(e)) for e in unpack(packed_entry)] == [1, 1, 1, 3, 1]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f.pop(b"n"), "without a count"),
        (lambda f: f.update({b"n": b"0"}), "without a count"),
        (lambda f: f.update({b"n": b"6"}), "does not describe 6 entries"),
        (lambda f: f.pop(b".x"), "field b'x' does not describe"),
        (lambda f: f.update({b".l": f[b".l"][:-1]}), "field b'l' is not the length"),
        (lambda f: f.update({b"#c": np.array([3, -2, 3, 3, 3], "<i4").tobytes()}), "field b'c' does not"),
        (lambda f: f.update({k: np.full(5, -1, "<i4").tobytes() for k in f if k[:1] == b"#"} | {
            k: b"" for k in f if k[:1] == b"."}), "an empty entry"),
    ],
)  # fmt: skip
def test_a_pack_that_does_not_add_up_is_malformed(mutate: object, reason: str) -> None:
    fields = pack(entries_of_one_moment())
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(MalformedEntry, match=reason):
        unpack(fields)


def test_appended_entries_are_packed_within_the_bounds() -> None:
    small = [encode(record()) for _ in range(2 * PACK_RECORDS + 10)]
    assert [held(e) for e in packed(small)] == [PACK_RECORDS, PACK_RECORDS, 10]
    assert packed(small[:1]) == small[:1]  # alone: as itself
    big = encode(record(input_type="image/png", input_bytes=b"\x00" * (PACK_BYTES // 3)))
    out = packed([big, big, big, big, small[0], big])
    assert [held(e) for e in out] == [2, 3, 1]  # three big ones are over PACK_BYTES: never together
    assert [p for e in out for p in unpack(e)] == [big, big, big, big, small[0], big]
    huge = encode(record(input_type="image/png", input_bytes=b"\x00" * (PACK_BYTES + 1)))
    assert packed([small[0], huge, small[1]]) == [small[0], huge, small[1]]  # a larger one goes alone
