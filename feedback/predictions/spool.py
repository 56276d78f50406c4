"""A local append-only spool for prediction records that could not reach Redis.

One file per writer process, `<dir>/<writer>.spool`, held under an exclusive `flock` while its
writer lives. Each frame is `length (u32) | crc32 (u32) | payload`, the payload being the
record's stream fields (`count (u16)`, then `key length (u16) key value length (u32) value` per
field). `append` returns only after `fsync`, so a record the client was answered with is on
disk. A torn last frame (a crash mid-write) fails its length or CRC check and is skipped: its
writer never returned, so nobody was answered with it.

Replay takes a file that no live writer holds (a dead writer's, or one its own writer sealed),
sends its frames on, and deletes it. Progress is checkpointed beside the file after every chunk,
so a replay that dies part-way resumes after the last sent chunk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from feedback.predictions.records import Fields

logger = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")
_COUNT = struct.Struct("<H")
_KEY = struct.Struct("<H")
_VALUE = struct.Struct("<I")

SUFFIX = ".spool"
SEALED_SUFFIX = ".sealed"
CHECKPOINT_SUFFIX = ".offset"


def pack(fields: Fields) -> bytes:
    parts = [_COUNT.pack(len(fields))]
    for key, value in fields.items():
        parts += [_KEY.pack(len(key)), key, _VALUE.pack(len(value)), value]
    payload = b"".join(parts)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def unpack(payload: bytes) -> Fields:
    (count,) = _COUNT.unpack_from(payload, 0)
    offset = _COUNT.size
    fields: Fields = {}
    for _ in range(count):
        (klen,) = _KEY.unpack_from(payload, offset)
        offset += _KEY.size
        key = payload[offset : offset + klen]
        offset += klen
        (vlen,) = _VALUE.unpack_from(payload, offset)
        offset += _VALUE.size
        fields[key] = payload[offset : offset + vlen]
        offset += vlen
    return fields


def read_frames(path: Path, start: int = 0) -> Iterator[tuple[int, Fields]]:
    """Yield (offset after the frame, fields) for every intact frame from `start`."""
    with path.open("rb") as f:
        f.seek(start)
        offset = start
        while True:
            header = f.read(_FRAME.size)
            if len(header) < _FRAME.size:
                if header:
                    logger.warning("%s: torn frame header at byte %d ignored", path.name, offset)
                return
            length, crc = _FRAME.unpack(header)
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                logger.warning("%s: torn or corrupt frame at byte %d ignored", path.name, offset)
                return
            offset += _FRAME.size + length
            yield offset, unpack(payload)


class SpoolWriter:
    """The spool file of one writer process. Appends are serialised by the caller."""

    def __init__(self, directory: Path, writer: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / f"{writer}{SUFFIX}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.pending = os.fstat(self._fd).st_size > 0

    def append(self, records: Sequence[Fields]) -> None:
        """Write and fsync; returns only once the records are durable."""
        data = b"".join(pack(r) for r in records)
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        self.pending = True

    def seal(self) -> Path | None:
        """Hand the current file over to replay and start a fresh one; None if it was empty."""
        if os.fstat(self._fd).st_size == 0:
            self.pending = False
            return None
        sealed = self.path.with_name(f"{self.path.stem}.{os.urandom(4).hex()}{SEALED_SUFFIX}")
        os.rename(self.path, sealed)
        old = self._fd
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(old)  # releases the lock on the sealed file
        self.pending = False
        return sealed

    def close(self) -> None:
        empty = os.fstat(self._fd).st_size == 0
        os.close(self._fd)
        if empty:
            self.path.unlink(missing_ok=True)


def replay_file(
    path: Path, send: Callable[[list[Fields]], None], *, chunk: int = 500, chunk_bytes: int = 16 << 20
) -> int | None:
    """Send every frame of an unheld spool file in chunks (of `chunk` frames or `chunk_bytes` bytes,
    whichever comes first), then delete it.

    Returns the number of frames sent, or None when a live writer holds the file.
    `send` must raise if the records did not reach their destination.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not path.exists():  # replayed and deleted by someone else meanwhile
            return None
        checkpoint = path.with_name(path.name + CHECKPOINT_SUFFIX)
        start = int(checkpoint.read_text()) if checkpoint.exists() else 0
        sent = 0
        batch: list[Fields] = []
        size = 0
        for offset, fields in read_frames(path, start):
            batch.append(fields)
            size += sum(map(len, fields.values()))
            if len(batch) >= chunk or size >= chunk_bytes:
                send(batch)
                sent += len(batch)
                batch, size = [], 0
                _write_checkpoint(checkpoint, offset)
        if batch:
            send(batch)
            sent += len(batch)
        path.unlink()
        checkpoint.unlink(missing_ok=True)
        return sent
    finally:
        os.close(fd)


def _write_checkpoint(path: Path, offset: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(offset))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def replayable(directory: Path) -> list[Path]:
    """Spool files in `directory`, sealed ones first (oldest first)."""
    if not directory.exists():
        return []
    files = [p for p in directory.iterdir() if p.name.endswith((SUFFIX, SEALED_SUFFIX))]
    return sorted(files, key=lambda p: (not p.name.endswith(SEALED_SUFFIX), p.stat().st_mtime))
