from __future__ import annotations

import os
from pathlib import Path

import pytest

from feedback.predictions import spool
from feedback.predictions.records import Fields

pytestmark = pytest.mark.unit


def entries(n: int, start: int = 0) -> list[Fields]:
    return [{b"id": str(i).encode(), b"x": os.urandom(i % 7)} for i in range(start, start + n)]


def test_frames_round_trip(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "w")
    writer.append(entries(3))
    writer.append(entries(2, start=3))
    frames = [fields for _, fields in spool.read_frames(writer.path)]
    assert [f[b"id"] for f in frames] == [b"0", b"1", b"2", b"3", b"4"]
    writer.close()


def test_a_torn_last_frame_is_skipped(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "w")
    writer.append(entries(4))
    writer.close()
    data = writer.path.read_bytes()
    writer.path.write_bytes(data[:-3])  # the crash cut the last frame short
    assert [f[b"id"] for _, f in spool.read_frames(writer.path)] == [b"0", b"1", b"2"]


def test_a_corrupt_frame_stops_the_read(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "w")
    writer.append(entries(3))
    writer.close()
    data = bytearray(writer.path.read_bytes())
    data[-1] ^= 0xFF
    writer.path.write_bytes(bytes(data))
    assert len(list(spool.read_frames(writer.path))) == 2


def test_a_live_writers_file_is_not_replayed(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "w")
    writer.append(entries(2))
    sent: list[Fields] = []
    assert spool.replay_file(writer.path, sent.extend) is None
    assert sent == []
    writer.close()


def test_a_dead_writers_file_is_replayed_once_and_deleted(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "dead")
    writer.append(entries(1200))
    os.close(writer._fd)  # the process died: its lock is gone, the file stays
    sent: list[Fields] = []
    assert spool.replay_file(writer.path, sent.extend, chunk=500) == 1200
    assert [f[b"id"] for f in sent] == [str(i).encode() for i in range(1200)]
    assert not writer.path.exists()
    assert spool.replayable(tmp_path) == []


def test_an_interrupted_replay_resumes_after_the_last_chunk(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "w")
    writer.append(entries(1000))
    sealed = writer.seal()
    assert sealed is not None and not writer.pending
    calls = 0
    sent: list[Fields] = []

    def flaky(batch: list[Fields]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("Redis went away")
        sent.extend(batch)

    with pytest.raises(ConnectionError):
        spool.replay_file(sealed, flaky, chunk=300)
    assert len(sent) == 300
    assert spool.replay_file(sealed, flaky, chunk=300) == 700
    assert [f[b"id"] for f in sent] == [str(i).encode() for i in range(1000)]  # nothing twice
    assert not sealed.exists()
    writer.close()


def test_seal_hands_over_and_keeps_writing(tmp_path: Path) -> None:
    writer = spool.SpoolWriter(tmp_path, "w")
    assert writer.seal() is None  # nothing to hand over
    writer.append(entries(2))
    sealed = writer.seal()
    writer.append(entries(1, start=2))
    assert sealed is not None
    assert spool.replayable(tmp_path)[0] == sealed  # sealed files first
    assert [f[b"id"] for _, f in spool.read_frames(writer.path)] == [b"2"]
    writer.close()
