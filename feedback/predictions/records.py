"""One stored prediction, and its encoding as a Redis stream entry (also used by the spool).

Entry fields use short keys because every prediction is written once per request path:
`id` (UUIDv7 text), `m` model name, `v` model version, `x` the input as .npy bytes,
`s` class scores as little-endian float32 bytes, `l` label, `c` confidence, `r` request id,
`g` client tags as JSON (absent when there are none), `t` the media type of an input kept as the
encoded image the client sent (absent for .npy arrays). A shadow's predictions on the samples of
one call (`ShadowBatch`) are one entry marked `k` = `shadows`: `ids` the answered predictions'
ids (16 bytes each), `s` their scores, `c` their confidences (float32), `l` and `r` their labels and
request ids (JSON lists); no input: each is its answered prediction's.
The entries appended in one moment travel as one entry, a pack (`pack`, `unpack`): `k` = `pack`,
and each field of the entries it holds, their values joined, with their lengths.
The prediction time is not a field: it is the UUIDv7's embedded timestamp.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from feedback.ids import uuid7_time_ms
from models.npy import MAGIC, NpyError, npy_bytes, read_header, read_npy

Fields = dict[bytes, bytes]


class MalformedEntry(ValueError):
    """A stream entry that cannot be decoded into a record; the message says why."""


@dataclass(frozen=True)
class PredictionRecord:
    id: uuid.UUID
    model_name: str
    model_version: str
    input: NDArray[Any]
    scores: NDArray[np.float32]
    label: str
    confidence: float
    request_id: str
    tags: dict[str, str] = field(default_factory=dict)
    # An image model's input as sent: the encoded bytes (in `input_bytes`) and their media type.
    input_type: str | None = None
    input_bytes: bytes | None = None

    @property
    def created_at(self) -> datetime:
        return created_at(self.id)

    @property
    def stored_input(self) -> bytes:
        """The bytes the log keeps of the input: the image as sent, or the array as .npy."""
        return self.input_bytes if self.input_bytes is not None else npy_bytes(self.input)

    @property
    def label_index(self) -> int:
        return int(np.argmax(self.scores))


SHADOWS = b"shadows"  # the `k` of an entry of a shadow's predictions


@dataclass(frozen=True)
class ShadowBatch:
    """A shadow's predictions for samples clients were answered for: the answered predictions' ids
    and request ids, the shadow's version and outputs (row i of `scores` is `ids[i]`'s)."""

    ids: list[uuid.UUID]
    model_name: str
    model_version: str
    scores: NDArray[np.float32]  # N x classes
    labels: list[str]
    confidences: NDArray[np.float32]
    request_ids: list[str]
    answer_ms: NDArray[np.float32] | None = None  # per sample: the answer's model call, as its request waited
    shadow_ms: float | None = None  # the shadow's call that ran them all


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_text(text: str) -> str | None:
    """Why Postgres would refuse `text` in a text or jsonb column, or None if it would store it.

    Postgres holds no U+0000 in text, and UTF-8 has no lone surrogates (which JSON's \\uD800
    escapes can carry). Checked at the door: an answered prediction must be storable.
    """
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    char = found.group()
    what = "the NUL character U+0000" if char == "\x00" else f"the lone surrogate U+{ord(char):04X}"
    return f"contains {what} at position {found.start()}, which cannot be stored"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_LAST_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)


def created_at(prediction_id: uuid.UUID) -> datetime:
    """The creation time a UUIDv7 carries, exact to the millisecond. A UUIDv7 can name a time
    after the year 9999, which no id made here does: such an id gives the latest time there is, so
    that looking it up finds nothing instead of failing."""
    return _EPOCH + timedelta(milliseconds=min(uuid7_time_ms(prediction_id), _LAST_MS))


def input_json(data: bytes, input_type: str | None) -> Any:
    """A stored input as JSON: the array as nested lists, or the image as sent (media type, base64)."""
    if input_type is None:
        return read_npy(data).tolist()
    return {"media_type": input_type, "base64": base64.b64encode(data).decode()}


def encode(record: PredictionRecord | ShadowBatch) -> Fields:
    if isinstance(record, ShadowBatch):
        return {
            b"id": str(record.ids[0]).encode(),  # the first: what a dead letter is known by
            b"k": SHADOWS,
            b"ids": b"".join(i.bytes for i in record.ids),
            b"m": record.model_name.encode(),
            b"v": record.model_version.encode(),
            b"s": np.asarray(record.scores, dtype="<f4").tobytes(),
            b"c": np.asarray(record.confidences, dtype="<f4").tobytes(),
            b"l": json.dumps(record.labels, separators=(",", ":")).encode(),
            b"r": json.dumps(record.request_ids, separators=(",", ":")).encode(),
        } | _latencies(record)
    fields: Fields = {
        b"id": str(record.id).encode(),
        b"m": record.model_name.encode(),
        b"v": record.model_version.encode(),
        b"x": record.stored_input,
        b"s": np.asarray(record.scores, dtype="<f4").tobytes(),
        b"l": record.label.encode(),
        b"c": repr(float(record.confidence)).encode(),
        b"r": record.request_id.encode(),
    }
    if record.tags:
        fields[b"g"] = json.dumps(record.tags, separators=(",", ":")).encode()
    if record.input_type is not None:
        fields[b"t"] = record.input_type.encode()
    return fields


def _latencies(record: ShadowBatch) -> Fields:
    if record.answer_ms is None or record.shadow_ms is None:
        return {}
    return {b"at": np.asarray(record.answer_ms, dtype="<f4").tobytes(), b"st": repr(float(record.shadow_ms)).encode()}


PACK = b"pack"  # the `k` of an entry that holds the entries appended in one moment
_NO_VALUE = -1  # a packed entry's length where that entry lacks the field


def pack(entries: Sequence[Fields]) -> Fields:
    """Entries appended in one moment as one stream entry (one XADD, one entry to read and trim).

    `k` = `pack`, `n` how many; for each field name `f` any of them has, `.f` the values joined
    and `#f` their lengths (little-endian int32, -1 where an entry lacks the field).
    """
    names: dict[bytes, None] = {}
    for entry in entries:
        names.update(dict.fromkeys(entry))
    packed: Fields = {b"k": PACK, b"n": str(len(entries)).encode()}
    for name in names:
        values = [entry.get(name) for entry in entries]
        packed[b"." + name] = b"".join(v for v in values if v is not None)
        lengths = [_NO_VALUE if v is None else len(v) for v in values]
        packed[b"#" + name] = struct.pack(f"<{len(lengths)}i", *lengths)
    return packed


def held(entry: Fields) -> int:
    """How many records a stream entry holds: a pack's count, else one."""
    return int(entry[b"n"]) if entry.get(b"k") == PACK else 1


def unpack(fields: Fields) -> list[Fields]:
    """The entries a stream entry holds: those of a pack, or the entry itself; `MalformedEntry`
    when a pack's lengths do not describe its values."""
    if fields.get(b"k") != PACK:
        return [fields]
    try:
        n = int(fields[b"n"])
    except (KeyError, ValueError):
        n = 0
    if n < 1:
        raise MalformedEntry("a pack without a count of its entries")
    entries: list[Fields] = [{} for _ in range(n)]
    for key, raw_lengths in fields.items():
        if key[:1] != b"#":
            continue
        name, values = key[1:], fields.get(b"." + key[1:])
        # struct, not numpy: for a few dozen lengths numpy's per-call cost dominates.
        lengths = struct.unpack(f"<{n}i", raw_lengths) if len(raw_lengths) == 4 * n else None
        if values is None or lengths is None or min(lengths) < _NO_VALUE:
            raise MalformedEntry(f"a pack's field {name!r} does not describe {n} entries")
        if sum(lengths) + lengths.count(_NO_VALUE) != len(values):
            raise MalformedEntry(f"a pack's field {name!r} is not the length its entries say")
        offset = 0
        for entry, length in zip(entries, lengths, strict=True):
            if length != _NO_VALUE:
                entry[name] = values[offset : offset + length]
                offset += length
    if not all(entries):
        raise MalformedEntry("a pack holds an empty entry")
    return entries


IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})  # what `predictions.input_type` allows


_REQUIRED = (b"id", b"m", b"v", b"x", b"s", b"l", b"c", b"r")
_REQUIRED_SET = frozenset(_REQUIRED)


class Row(NamedTuple):
    """A decoded entry ready for Postgres: the input stays as its validated .npy bytes.

    A named tuple rather than a frozen dataclass: ingest builds tens of thousands a second.
    """

    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    label_index: int
    confidence: float
    scores: bytes  # little-endian float32, one per class
    input_npy: bytes | None  # None once moved to the object store (`feedback.predictions.blobs`)
    request_id: str
    tags: dict[str, str]
    input_type: str | None = None  # None: .npy; else the media type of an image as sent
    input_key: str | None = None  # the input's object, when it is in the object store
    input_size: int | None = None
    input_sha256: str | None = None


class ShadowRow(NamedTuple):
    """A decoded shadow entry ready for Postgres."""

    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    label_index: int
    confidence: float
    scores: bytes  # little-endian float32, one per class
    request_id: str
    answer_ms: float | None = None  # the answer's model call, as its request waited for it
    shadow_ms: float | None = None  # the shadow's call


def _check_npy(data: bytes) -> None:
    """The log keeps plain .npy of numbers, as `npy_bytes` writes them: version 1.0, C order."""
    try:
        plain = read_header(data).plain
    except NpyError:
        plain = False
    if not plain:
        numpy = len(data) >= 10 and data[:6] == MAGIC
        raise MalformedEntry("input is not .npy data of numbers" if numpy else "input is not .npy data")


def decode_row(fields: Fields) -> Row:
    """Validate an entry and turn it into a row; raises `MalformedEntry` naming the first problem."""
    if not fields.keys() >= _REQUIRED_SET:
        missing = [k.decode() for k in _REQUIRED if k not in fields]
        raise MalformedEntry(f"missing fields: {', '.join(missing)}")
    try:
        prediction_id = uuid.UUID(fields[b"id"].decode())
    except (ValueError, UnicodeDecodeError):
        raise MalformedEntry("id is not a UUID") from None
    if prediction_id.version != 7:
        raise MalformedEntry("id is not a version 7 UUID")
    data = fields[b"x"]
    input_type = fields.get(b"t")
    if input_type is None:
        _check_npy(data)
    elif input_type.decode(errors="replace") not in IMAGE_TYPES or not data:
        raise MalformedEntry(f"input type {input_type!r} is not an image type this log keeps")
    raw_scores = fields[b"s"]
    if len(raw_scores) % 4 or not raw_scores:
        raise MalformedEntry("scores are not float32 bytes")
    # struct and math, not numpy: for ten numbers a row, numpy's per-call cost dominates.
    scores = struct.unpack(f"<{len(raw_scores) // 4}f", raw_scores)
    try:
        confidence = float(fields[b"c"])
        tags = json.loads(fields[b"g"]) if b"g" in fields else {}
        text = {k: fields[k].decode() for k in (b"m", b"v", b"l", b"r")}
    except (ValueError, UnicodeDecodeError):
        raise MalformedEntry("confidence, tags or a text field is not valid") from None
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise MalformedEntry("tags are not a JSON object of strings")
    if not math.isfinite(confidence) or not all(map(math.isfinite, scores)):
        raise MalformedEntry("confidence or scores are not finite")
    return Row(
        id=prediction_id,
        created_at=created_at(prediction_id),
        model_name=text[b"m"],
        model_version=text[b"v"],
        label=text[b"l"],
        label_index=max(range(len(scores)), key=scores.__getitem__),
        confidence=confidence,
        scores=raw_scores,
        input_npy=data,
        request_id=text[b"r"],
        tags=tags,
        input_type=None if input_type is None else input_type.decode(),
    )


def decode_entry(fields: Fields) -> list[Row] | list[ShadowRow]:
    """An entry's rows: a prediction's, or a shadow's for each sample of its call; `MalformedEntry`
    naming the first problem."""
    kind = fields.get(b"k")
    if kind is None:
        return [decode_row(fields)]
    if kind != SHADOWS:
        raise MalformedEntry(f"unknown kind of entry {kind!r}")
    return _shadow_rows(fields)


_SHADOW_REQUIRED = (b"ids", b"m", b"v", b"s", b"c", b"l", b"r")


def _shadow_rows(fields: Fields) -> list[ShadowRow]:
    missing = [k.decode() for k in _SHADOW_REQUIRED if k not in fields]
    if missing:
        raise MalformedEntry(f"missing fields: {', '.join(missing)}")
    raw_ids, raw_scores, raw_confidences = fields[b"ids"], fields[b"s"], fields[b"c"]
    n = len(raw_ids) // 16
    if not n or len(raw_ids) % 16 or len(raw_confidences) != 4 * n or not raw_scores or len(raw_scores) % (4 * n):
        raise MalformedEntry("ids, scores and confidences do not describe the same samples")
    try:
        ids = [uuid.UUID(bytes=raw_ids[i : i + 16]) for i in range(0, len(raw_ids), 16)]
        labels, request_ids = json.loads(fields[b"l"]), json.loads(fields[b"r"])
        name, version = fields[b"m"].decode(), fields[b"v"].decode()
    except (ValueError, UnicodeDecodeError):
        raise MalformedEntry("labels, request ids or a text field is not valid") from None
    texts = [*labels, *request_ids] if isinstance(labels, list) and isinstance(request_ids, list) else None
    if texts is None or len(labels) != n or len(request_ids) != n or not all(isinstance(t, str) for t in texts):
        raise MalformedEntry("labels and request ids are not one text a sample")
    if any(i.version != 7 for i in ids):
        raise MalformedEntry("an id is not a version 7 UUID")
    scores = np.frombuffer(raw_scores, dtype="<f4").reshape(n, -1)
    confidences = np.frombuffer(raw_confidences, dtype="<f4")
    if not (np.isfinite(scores).all() and np.isfinite(confidences).all()):
        raise MalformedEntry("confidence or scores are not finite")
    width = scores.shape[1] * 4
    answer_ms, shadow_ms = _timings(fields, n)
    indices, confidence_values = scores.argmax(axis=1).tolist(), confidences.tolist()
    columns = zip(ids, labels, indices, confidence_values, _cut(raw_scores, width), request_ids, answer_ms, strict=True)
    return [
        ShadowRow(i, created_at(i), name, version, label, index, c, raw, request, a, shadow_ms)
        for i, label, index, c, raw, request, a in columns
    ]


def _timings(fields: Fields, n: int) -> tuple[list[float | None], float | None]:
    """Each sample's answer call time and the shadow's call time in milliseconds (None where an
    entry does not carry them)."""
    raw_answer, raw_shadow = fields.get(b"at"), fields.get(b"st")
    if raw_answer is None or raw_shadow is None:
        return [None] * n, None
    try:
        shadow_ms = float(raw_shadow)
    except ValueError:
        raise MalformedEntry("the shadow's call time is not a number") from None
    if len(raw_answer) != 4 * n:
        raise MalformedEntry("the answer call times do not describe the samples")
    answer_ms = np.frombuffer(raw_answer, dtype="<f4")
    if not (np.isfinite(answer_ms).all() and math.isfinite(shadow_ms)) or shadow_ms < 0 or (answer_ms < 0).any():
        raise MalformedEntry("a call time is negative or not finite")
    return [float(a) for a in answer_ms], shadow_ms


def _cut(data: bytes, width: int) -> list[bytes]:
    return [data[i : i + width] for i in range(0, len(data), width)]


def decode(fields: Fields) -> PredictionRecord:
    """Inverse of `encode` for a prediction; raises `MalformedEntry` naming the first problem found."""
    if b"k" in fields:
        raise MalformedEntry("a shadow's entry, not a prediction")
    row = decode_row(fields)
    image = row.input_type is not None
    return PredictionRecord(
        id=row.id,
        model_name=row.model_name,
        model_version=row.model_version,
        input=np.zeros(0, np.float32) if image or row.input_npy is None else read_npy(row.input_npy),
        scores=np.frombuffer(row.scores, dtype="<f4").astype(np.float32),
        label=row.label,
        confidence=row.confidence,
        request_id=row.request_id,
        tags=row.tags,
        input_type=row.input_type,
        input_bytes=row.input_npy if image else None,
    )
