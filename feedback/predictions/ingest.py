"""The ingest worker: Redis stream -> Postgres, at least once, stored exactly once.

Each round reads a batch with the consumer group, stores it idempotently (a binary COPY into a
staging table, then one INSERT ... ON CONFLICT DO NOTHING: `feedback/predictions/store.py`), and only then
acknowledges it. A worker that dies between the two leaves its entries pending; any worker
of the group claims them (XAUTOCLAIM) once they have been idle for `claim_idle_ms`, and the
insert skips ids already stored. A pack (the records appended in one moment) is unpacked into
its entries. Entries that cannot be decoded or stored go to the dead-letter stream with the
reason, so they are neither retried forever nor fatal. Acknowledged entries are trimmed from the
stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feedback.errors import Unavailable
from feedback.keys import INGEST_GROUP, Keys
from feedback.predictions import blobs, store
from feedback.predictions.dead_letters import dead_fields
from feedback.predictions.records import SHADOWS, Fields, MalformedEntry, Row, ShadowRow, decode_entry, unpack

logger = logging.getLogger(__name__)

Entry = tuple[bytes, Fields]
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


@dataclass(frozen=True)
class IngestConfig:
    batch_size: int = 2000
    block_ms: int = 500
    claim_idle_ms: int = 30_000  # a pending entry idle this long belongs to a dead consumer
    housekeeping_every_s: float = 2.0  # how often to claim abandoned entries and trim the stream
    # After a short batch, wait this long before reading again: at low traffic the worker then
    # stores a few dozen records per round instead of one, and leaves the CPU to the service.
    linger_ms: int = 100


@dataclass
class _Prepared:
    """A decoded batch waiting to be stored."""

    entries: Sequence[Entry]
    parts: list[Entry] = field(default_factory=list)  # the entries a pack holds, under its id
    rows: list[Row | ShadowRow] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)


@dataclass
class IngestStats:
    ingested: int = 0  # rows newly inserted
    duplicates: int = 0  # entries whose id was already stored
    dead: int = 0
    claimed: int = 0


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    try:
        client.xgroup_create(keys.stream, INGEST_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class IngestWorker:
    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        connect: Callable[[], psycopg.Connection],
        keys: Keys,
        consumer: str,
        config: IngestConfig | None = None,
        on_stats: Callable[[IngestStats], None] | None = None,
    ) -> None:
        self.redis = redis_client
        self.connect = connect
        self.keys = keys
        self.consumer = consumer
        self.config = config or IngestConfig()
        self.stats = IngestStats()
        self._on_stats = on_stats
        self._conn: psycopg.Connection | None = None
        self._last_housekeeping = 0.0
        self._submit: Callable[[_Prepared], None] = self.commit
        self._last_read = 0  # entries the latest read returned

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; batches in hand are stored and acknowledged first.

        Two stages overlap: this thread reads and decodes the next batch while a writer thread
        stores and acknowledges the previous one (Postgres's share of the work runs meanwhile).
        """
        logger.info("ingest worker %s reading %s", self.consumer, self.keys.stream)
        self._with_retries(stop, self._finish_own_pending)
        handoff: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)
        failure: list[BaseException] = []

        def write() -> None:
            while (prepared := handoff.get()) is not None:
                try:
                    self._with_retries(stop, functools.partial(self.commit, prepared), give_up_on_stop=False)
                except BaseException as exc:
                    failure.append(exc)
                    return

        writer = threading.Thread(target=write, name=f"ingest-writer-{self.consumer}", daemon=True)
        writer.start()
        self._submit = handoff.put
        try:
            while not stop.is_set() and not failure:
                self._with_retries(stop, self.step)
                if 0 < self._last_read < self.config.batch_size:
                    stop.wait(self.config.linger_ms / 1000)
        finally:
            self._submit = self.commit
            if writer.is_alive():
                handoff.put(None)
                writer.join()
            self.close()
        if failure:
            raise failure[0]
        logger.info("ingest worker %s stopped: %s", self.consumer, self.stats)

    def _finish_own_pending(self) -> None:
        # Entries delivered to this consumer name before a restart come first, one batch at a time.
        ensure_group(self.redis, self.keys)
        while self._read("0"):
            pass

    def _with_retries(self, stop: threading.Event, action: Callable[[], object], give_up_on_stop: bool = True) -> None:
        backoff = 0.1
        while True:
            try:
                action()
                return
            except REDIS_DOWN as exc:
                if give_up_on_stop and stop.is_set():
                    return
                logger.warning("Redis unreachable (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if not give_up_on_stop and stop.is_set() and backoff >= 5.0:
                    # Shutting down with Redis gone: the batch stays pending and is claimed later.
                    return

    def step(self) -> int:
        """One round: housekeeping when due, then one blocking read. Returns entries handled."""
        handled = 0
        ensure_group(self.redis, self.keys)
        if time.monotonic() - self._last_housekeeping >= self.config.housekeeping_every_s:
            handled += self.claim_abandoned()
            self.trim()
            self._last_housekeeping = time.monotonic()
        self._last_read = self._read(">")
        return handled + self._last_read

    def _read(self, from_id: str) -> int:
        response: Any = self.redis.xreadgroup(
            INGEST_GROUP,
            self.consumer,
            {self.keys.stream: from_id},
            count=self.config.batch_size,
            block=self.config.block_ms if from_id == ">" else None,
        )
        entries: list[Entry] = [e for _, batch in response or [] for e in batch if e[1]]
        if entries:
            if from_id == ">":
                self._submit(self.prepare(entries))
            else:  # re-reading our own pending entries: finish each before reading again
                self.commit(self.prepare(entries))
        return len(entries)

    def claim_abandoned(self) -> int:
        """Take over entries another consumer read but never acknowledged."""
        total, cursor = 0, "0-0"
        while True:
            result: Any = self.redis.xautoclaim(
                self.keys.stream,
                INGEST_GROUP,
                self.consumer,
                min_idle_time=self.config.claim_idle_ms,
                start_id=cursor,
                count=self.config.batch_size,
            )
            cursor, claimed = result[0], [e for e in result[1] if e[1]]
            if claimed:
                logger.info("claimed %d abandoned entries", len(claimed))
                self.stats.claimed += len(claimed)
                self._submit(self.prepare(claimed))
                total += len(claimed)
            # Entries deleted while pending come back as ids only (third element); acknowledge them.
            deleted = result[2] if len(result) > 2 else []
            if deleted:
                self.redis.xack(self.keys.stream, INGEST_GROUP, *deleted)
            if cursor in (b"0-0", "0-0"):
                return total

    # -- one batch -------------------------------------------------------------------------------

    def prepare(self, entries: Sequence[Entry]) -> _Prepared:
        """Each entry's rows; a malformed entry, or one a pack holds, is set aside to be dead-lettered
        (the rest of its pack is stored)."""
        prepared = _Prepared(entries=entries)
        for entry_id, fields in entries:
            try:
                parts = unpack(fields)
            except MalformedEntry as exc:
                prepared.dead.append(((entry_id, fields), str(exc)))
                continue
            for part in parts:
                try:
                    prepared.rows.extend(decode_entry(part))
                    prepared.parts.append((entry_id, part))
                except MalformedEntry as exc:
                    prepared.dead.append(((entry_id, part), str(exc)))
        return prepared

    def commit(self, prepared: _Prepared) -> None:
        """Store, then dead-letter and acknowledge: only what is stored (or dead) is acknowledged."""
        dead = prepared.dead + self._store(prepared.rows, prepared.parts)
        pipe = self.redis.pipeline(transaction=False)
        for (entry_id, fields), reason in dead:
            pipe.xadd(self.keys.dead_letters, dead_fields(fields, entry_id=entry_id, reason=reason))  # type: ignore[arg-type]
        pipe.xack(self.keys.stream, INGEST_GROUP, *(e[0] for e in prepared.entries))
        pipe.execute()
        if dead:
            self.stats.dead += len(dead)
            # A client may have been answered for each of these: someone must look (`loop dead-letters`).
            logger.error(
                "moved %d prediction entries to %s, not stored: %s (inspect and replay with `loop dead-letters`)",
                len(dead),
                self.keys.dead_letters,
                dead[0][1],
            )
        if self._on_stats is not None:
            self._on_stats(self.stats)

    def _store(self, records: list[Row | ShadowRow], entries: Sequence[Entry]) -> list[tuple[Entry, str]]:
        """Insert, retrying while Postgres is down. Returns the entries (a pack's parts) whose rows
        were refused."""
        if not records:
            return []
        backoff = 0.1
        while True:
            try:
                conn = self._connection()
                objects = blobs.of(conn)
                if objects is not None:  # large inputs into the object store first, then the rows naming them
                    records = objects.offload(records)
                inserted = store.insert_rows(conn=conn, rows=records)
                self.stats.ingested += inserted
                self.stats.duplicates += len(records) - inserted
                return []
            except Unavailable as exc:
                logger.warning("%s; retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except psycopg.OperationalError as exc:
                self._drop_connection()
                logger.warning("Postgres unavailable (%s); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except psycopg.DataError:
                # One bad row fails the whole statement: store the rest one by one.
                return self._store_one_by_one(records, entries)

    def _store_one_by_one(self, records: list[Row | ShadowRow], entries: Sequence[Entry]) -> list[tuple[Entry, str]]:
        # A prediction and its shadows' share the id; a shadow's entry holds several: a row is
        # found by its id, version and kind.
        by_key = {key: e for e in entries for key in _keys(e[1])}
        refused = []
        conn = self._connection()
        for record in records:
            try:
                inserted = store.insert_rows(conn=conn, rows=[record])
                self.stats.ingested += inserted
                self.stats.duplicates += 1 - inserted
            except psycopg.DataError as exc:
                kind = SHADOWS if isinstance(record, ShadowRow) else None
                entry = by_key[(str(record.id), record.model_version, kind)]
                refused.append((entry, f"refused by Postgres: {exc}".strip()))
        return refused

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    # -- stream upkeep -------------------------------------------------------------------------

    def trim(self) -> int:
        """Delete entries every group has acknowledged. Returns entries removed."""
        groups: Any = self.redis.xinfo_groups(self.keys.stream)
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for group in groups:
            name = group["name"]
            pending: Any = self.redis.xpending(self.keys.stream, name)
            if pending["pending"]:
                candidate = _parse_id(pending["min"])
            else:
                ms, seq = _parse_id(group["last-delivered-id"])
                candidate = (ms, seq + 1)
            floor = candidate if floor is None else min(floor, candidate)
        assert floor is not None
        removed = int(self.redis.xtrim(self.keys.stream, minid=f"{floor[0]}-{floor[1]}", approximate=False))
        return removed

    def close(self) -> None:
        self._drop_connection()


def _keys(fields: Fields) -> list[tuple[str, str, bytes | None]]:
    """The (id, version, kind) of each row an entry holds."""
    version, kind = fields.get(b"v", b"").decode(errors="replace"), fields.get(b"k")
    if kind is None:
        return [(fields.get(b"id", b"").decode(errors="replace"), version, None)]
    raw = fields.get(b"ids", b"")
    return [(str(uuid.UUID(bytes=raw[i : i + 16])), version, kind) for i in range(0, len(raw) - 15, 16)]


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def lag(client: redis.Redis, keys: Keys) -> tuple[int, float]:
    """Entries not yet acknowledged by the ingest group, and the age in seconds of the oldest."""
    try:
        groups: Any = client.xinfo_groups(keys.stream)
    except ResponseError:  # no stream yet
        return 0, 0.0
    group = next((g for g in groups if g["name"] in (INGEST_GROUP, INGEST_GROUP.encode())), None)
    if group is None:
        return int(client.xlen(keys.stream)), 0.0
    pending: Any = client.xpending(keys.stream, INGEST_GROUP)
    undelivered = group.get("lag")
    if undelivered is None:
        # Redis cannot always tell (after deletions, or a group made at an arbitrary id): look.
        first_undelivered = client.xrange(keys.stream, min="(" + _id_text(group), count=1)
        undelivered = max(int(client.xlen(keys.stream)) - int(pending["pending"]), 1) if first_undelivered else 0
    count = int(pending["pending"]) + int(undelivered)
    if count == 0:
        return 0, 0.0
    oldest: Any = (
        pending["min"] if pending["pending"] else client.xrange(keys.stream, min="(" + _id_text(group), count=1)
    )
    oldest_id = oldest if isinstance(oldest, (bytes, str)) else oldest[0][0] if oldest else None
    if oldest_id is None:
        return count, 0.0
    age = time.time() - _parse_id(oldest_id)[0] / 1000
    return count, max(age, 0.0)


def _id_text(group: Any) -> str:
    value = group["last-delivered-id"]
    return value.decode() if isinstance(value, bytes) else str(value)
