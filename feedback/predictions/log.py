"""The request-path half of the prediction log: records go to a Redis stream before the answer.

Concurrent `append` calls are coalesced: while one write is in flight, new records queue, and
the next write takes them all as one stream entry (a pack: `records.pack`, at most `PACK_RECORDS`
records or `PACK_BYTES` bytes of them each), so a burst of answers costs one Redis round trip and
one XADD rather than one a request. When Redis cannot be reached, records go to the local spool (policy `spool`, the
default) or the append fails (policy `refuse`, and the service answers 503). A replay task moves
spooled records into the stream once Redis answers again.

The stream holds records until the ingest worker has stored them (it trims what it acknowledged),
so its memory grows with the ingest lag. With `max_stream_bytes`, the stream counts as full while
Redis reports it larger (MEMORY USAGE, sampled, checked at most every `STREAM_CHECK_S`): records
are then spooled as when Redis is down (or refused, by the same policy), and the spool is replayed
only once the stream is back under 90% of the bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feedback.errors import Unavailable
from feedback.ids import uuid7_time_ms
from feedback.keys import Keys
from feedback.predictions import spool
from feedback.predictions.records import Fields, PredictionRecord, ShadowBatch, decode, encode, held, pack, unpack

logger = logging.getLogger(__name__)

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
PACK_RECORDS = 512  # at most this many records in one stream entry
PACK_BYTES = 4 << 20  # nor more bytes than this (images are large); a larger record goes alone
STREAM_CHECK_S = 0.25  # how often the stream's memory is asked for, at most
STREAM_SAMPLES = 16  # listpack nodes MEMORY USAGE samples to estimate the stream's size
RESUME_AT = 0.9  # a full stream takes records again below this share of the bound


class LogPolicy(StrEnum):
    SPOOL = "spool"  # answer anyway; keep the records on local disk until Redis is back
    REFUSE = "refuse"  # answer 503 rather than serve a prediction that is not in Redis


class Destination(StrEnum):
    REDIS = "redis"
    SPOOL = "spool"


class LogUnavailable(Unavailable):
    """Redis is unreachable and the policy is to refuse."""


class Event(StrEnum):
    APPENDED = "appended"
    SPOOLED = "spooled"
    REPLAYED = "replayed"


@dataclass
class _Pending:
    fields: list[Fields]
    future: asyncio.Future[Destination]


class PredictionLog:
    def __init__(
        self,
        redis_url: str,
        *,
        keys: Keys,
        spool_dir: Path,
        writer: str,
        policy: LogPolicy = LogPolicy.SPOOL,
        retry_after_s: float = 1.0,
        on_event: Callable[[Event, int], None] | None = None,
        pack_records: int = PACK_RECORDS,
        max_stream_bytes: int | None = None,
    ) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2.0)
        self._replay_redis = redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2.0)
        self._keys = keys
        self._policy = policy
        self._spool = spool.SpoolWriter(spool_dir, writer)
        self._spool_dir = spool_dir
        self._retry_after_s = retry_after_s
        self._on_event = on_event or (lambda event, n: None)
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._down_until = 0.0  # while in the future, skip Redis and spool at once
        self._closed = False
        self._pack_records = pack_records  # 1: an entry a record, as the log wrote before packs
        self._max_stream_bytes = max_stream_bytes or None
        self._full = False
        self._checked_at = -STREAM_CHECK_S

    @property
    def redis_available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def stream_full(self) -> bool:
        """Whether the stream is at its memory bound (always False without one). Raises what an
        unreachable Redis raises."""
        if self._max_stream_bytes is None:
            return False
        now = time.monotonic()
        if now - self._checked_at >= STREAM_CHECK_S:
            self._checked_at = now
            used = await self._redis.memory_usage(self._keys.stream, samples=STREAM_SAMPLES) or 0
            bound = self._max_stream_bytes * (RESUME_AT if self._full else 1.0)
            if (used >= bound) != self._full:
                self._full = not self._full
                logger.warning(
                    "the prediction stream is %s (%d bytes; bound %d): %s",
                    "full" if self._full else "below its bound again",
                    used,
                    self._max_stream_bytes,
                    f"records go to the {self._policy.value}" if self._full else "records go to Redis",
                )
        return self._full

    async def append(self, records: Sequence[PredictionRecord | ShadowBatch]) -> Destination:
        """Return once every record is in the stream or fsync'd to the spool."""
        if self._closed:
            raise LogUnavailable("the prediction log is closed")
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="log-flusher")
        future: asyncio.Future[Destination] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending([encode(r) for r in records], future))
        self._wakeup.set()
        return await future

    async def _flush_loop(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            taken = list(self._queue)
            self._queue.clear()
            try:
                destination = await self._write(packed([f for p in taken for f in p.fields], self._pack_records))
            except Exception as exc:
                for p in taken:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p in taken:
                if not p.future.done():
                    p.future.set_result(destination)

    async def _write(self, entries: list[Fields]) -> Destination:
        records = sum(map(held, entries))
        if self.redis_available:
            try:
                if await self.stream_full():
                    return await self._refused_or_spooled(entries, records, "the prediction stream is full")
                if len(entries) == 1:
                    await self._redis.xadd(self._keys.stream, entries[0])  # type: ignore[arg-type]
                else:
                    pipe = self._redis.pipeline(transaction=False)
                    for entry in entries:
                        pipe.xadd(self._keys.stream, entry)  # type: ignore[arg-type]
                    await pipe.execute()
                self._on_event(Event.APPENDED, records)
                return Destination.REDIS
            except UNREACHABLE as exc:
                self._down_until = time.monotonic() + self._retry_after_s
                logger.warning("Redis unreachable (%s); %s", exc, self._policy.value)
        # Some of a failed pipeline may have reached Redis; spooling all of it can duplicate
        # entries in the stream, never lose them. The ingest insert is idempotent on the id.
        return await self._refused_or_spooled(entries, records, "the prediction log (Redis) is unreachable")

    async def _refused_or_spooled(self, entries: list[Fields], records: int, why: str) -> Destination:
        if self._policy is LogPolicy.REFUSE:
            raise LogUnavailable(why)
        await asyncio.to_thread(self._spool.append, entries)
        self._on_event(Event.SPOOLED, records)
        return Destination.SPOOL

    async def replay(self) -> int:
        """Move spooled records into the stream if Redis answers; returns how many moved."""
        try:
            await self._redis.ping()
        except UNREACHABLE:
            self._down_until = time.monotonic() + self._retry_after_s
            return 0
        self._down_until = 0.0
        if await self.stream_full():
            return 0  # the spool waits until the ingest worker has made room
        if self._spool.pending:
            await asyncio.to_thread(self._spool.seal)
        # Bounded, one spool file a round, so that a long outage's backlog cannot overfill the stream.
        moved = await asyncio.to_thread(self._replay_files, 1 if self._max_stream_bytes else None)
        if moved:
            self._on_event(Event.REPLAYED, moved)
            logger.info("replayed %d spooled records into %s", moved, self._keys.stream)
        return moved

    def _replay_files(self, most: int | None = None) -> int:
        moved = 0

        def send(batch: list[Fields]) -> None:
            nonlocal moved
            pipe = self._replay_redis.pipeline(transaction=False)
            for f in batch:
                pipe.xadd(self._keys.stream, f)  # type: ignore[arg-type]
            pipe.execute()
            moved += sum(map(held, batch))

        for path in spool.replayable(self._spool_dir)[:most]:
            try:
                spool.replay_file(path, send)
            except UNREACHABLE:
                return moved  # try again on the next round
        return moved

    async def run_replayer(self, interval_s: float = 1.0) -> None:
        """Replay forever (a background task of the service)."""
        while not self._closed:
            try:
                await self.replay()
            except Exception:
                logger.exception("spool replay failed; retrying")
            await asyncio.sleep(interval_s)

    async def find(
        self, prediction_id: uuid.UUID, *, window_s: float = 10.0, scan: int = 10_000
    ) -> PredictionRecord | None:
        """Look for a record still in the stream (not yet ingested and trimmed).

        Entries are appended within moments of the prediction, so the search starts at the time
        the UUIDv7 carries, less `window_s`, and reads at most `scan` entries.
        """
        start_ms = max(uuid7_time_ms(prediction_id) - int(window_s * 1000), 0)
        wanted = str(prediction_id).encode()
        cursor = f"{start_ms}-0"
        remaining = scan
        while remaining > 0:
            entries: Any = await self._redis.xrange(self._keys.stream, min=cursor, count=min(remaining, 1000))
            if not entries:
                return None
            for _entry_id, entry in entries:
                if wanted not in entry.get(b"id", b"") + entry.get(b".id", b""):
                    continue
                for fields in unpack(entry):
                    if fields.get(b"id") == wanted and b"k" not in fields:  # a prediction's, not a shadow's
                        return decode(fields)
            remaining -= len(entries)
            cursor = "(" + entries[-1][0].decode()
        return None

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._wakeup.set()
            await self._flusher
        self._spool.close()
        await self._redis.aclose()
        self._replay_redis.close()


def packed(entries: list[Fields], records: int = PACK_RECORDS) -> list[Fields]:
    """Entries as stream entries to append: packs of up to `records` entries and `PACK_BYTES`
    bytes (a larger entry alone); an entry with no company as itself."""
    out: list[Fields] = []
    start, size = 0, 0
    for end, entry in enumerate(entries):
        length = sum(map(len, entry.values()))
        if end > start and (end - start == records or size + length > PACK_BYTES):
            out.append(_one(entries[start:end]))
            start, size = end, 0
        size += length
    if start < len(entries):
        out.append(_one(entries[start:]))
    return out


def _one(entries: list[Fields]) -> Fields:
    return entries[0] if len(entries) == 1 else pack(entries)
