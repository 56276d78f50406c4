"""The prediction log by day: a fresh database is partitioned, an old one is upgraded with every row
and reference kept, partitions are made ahead and on demand, and retention drops whole partitions
while the items that must outlive them stay reachable by id."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest

from feedback.ids import compose_uuid7
from feedback.migrate import available, migrate
from feedback.predictions import partitions, retention, store
from feedback.predictions.records import PredictionRecord, Row, decode_row, encode
from feedback.predictions.records import created_at as uuid_created_at
from feedback.review import Role, create_user
from feedback.review.moderation import Verdict
from feedback.review.verdicts import erase_input, record_outside
from harness import throwaway_database
from tests.conftest import POSTGRES

pytestmark = pytest.mark.data

NOW = datetime(2026, 12, 4, 15, 0, tzinfo=UTC)


def rows_on(days: list[date], per_day: int, seed: int = 0) -> list[Row]:
    """`per_day` predictions at noon (UTC) of each day, in order."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in days:
        for n in range(per_day):
            at = datetime(day.year, day.month, day.day, 12, n, tzinfo=UTC)
            record = PredictionRecord(
                id=compose_uuid7(int(at.timestamp() * 1000), 0, int(rng.integers(0, 2**62))),
                model_name="digits-cnn", model_version="v1", label=str(n % 10), confidence=0.9,
                input=rng.integers(0, 17, size=(8, 8)).astype(np.float32), scores=np.full(10, 0.1, np.float32),
                request_id=f"r{n}",
            )  # fmt: skip
            rows.append(decode_row(encode(record)))
    return rows


def snapshot(conn: psycopg.Connection, where: str = "TRUE", columns: str = "*") -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT {columns} FROM predictions WHERE {where} ORDER BY id").fetchall()


def relkind(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT relkind FROM pg_class WHERE oid = 'predictions'::regclass").fetchone()
    assert row is not None
    return str(row[0])


def test_a_fresh_database_is_partitioned_a_partition_a_day(conn: psycopg.Connection) -> None:
    assert relkind(conn) == "p" and partitions.partitions(conn) == []
    days = [date(2026, 11, 2), date(2026, 11, 3), date(2026, 11, 9)]
    store.insert_rows(conn=conn, rows=rows_on(days, per_day=3))
    found = partitions.partitions(conn)
    assert [p.name for p in found] == ["predictions_p20261102", "predictions_p20261103", "predictions_p20261109"]
    assert all((p.high - p.low).days == 1 for p in found if p.low is not None)
    for p in found:  # each row in its day's partition
        count = conn.execute(f"SELECT count(*) FROM {p.name}").fetchone()
        assert count == (3,)
    created = partitions.ahead(conn, days=7, today=date(2026, 11, 9))
    assert created == [f"predictions_p202611{d:02d}" for d in (8, 10, 11, 12, 13, 14, 15, 16)]  # the 9th exists
    assert partitions.ahead(conn, days=7, today=date(2026, 11, 9)) == []  # known: nothing asked


@pytest.fixture
def old_database() -> Iterator[str]:
    """A database with the schema before partitioning (migrations up to 0009)."""
    with throwaway_database(POSTGRES, kind="test") as url:
        with psycopg.connect(url) as c:
            migrate(c, up_to=9)
        yield url


def test_an_old_database_is_upgraded_with_every_row_and_reference_kept(old_database: str) -> None:
    with psycopg.connect(old_database, autocommit=True) as conn:
        assert relkind(conn) == "r"
        rows = rows_on([date(2026, 10, 1) + timedelta(days=d) for d in range(0, 60, 3)], per_day=5)
        columns = "id, created_at, model_name, model_version, label, label_index, confidence, scores, input, request_id"
        with conn.cursor() as cursor:  # as the ingest worker of that schema wrote them
            cursor.executemany(
                f"INSERT INTO predictions ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(r.id, r.created_at, r.model_name, r.model_version, r.label, r.label_index, r.confidence,
                  list(np.frombuffer(r.scores, "<f4").astype(float)), r.input_npy, r.request_id) for r in rows],
            )  # fmt: skip
        user, _ = create_user(conn=conn, name="ann", role=Role.REVIEWER)
        judged = [r.id for r in rows[::7]]
        for item in judged:  # as that schema's reviewing wrote a verdict and the item's state
            created = uuid_created_at(item)
            revision = conn.execute(
                "INSERT INTO annotations (prediction_id, item_created_at, actor_id, verdict, reason)"
                " VALUES (%s, %s, %s, 'correct', 'x') RETURNING id",
                (item, created, user.id),
            ).fetchone()
            conn.execute(
                "INSERT INTO review_state (prediction_id, item_created_at, status, label, revision, reviewers)"
                " SELECT id, created_at, 'reviewed', label, %s, 1 FROM predictions WHERE id = %s",
                (revision[0] if revision else None, item),
            )
        cursor = conn.execute("SELECT * FROM predictions LIMIT 0")
        old_columns = ", ".join(c.name for c in cursor.description or ())  # later migrations add columns
        cursor = conn.execute("SELECT * FROM annotations LIMIT 0")
        old_annotation_columns = ", ".join(c.name for c in cursor.description or ())
        before = snapshot(conn)
        annotations = conn.execute(f"SELECT {old_annotation_columns} FROM annotations ORDER BY id").fetchall()

        assert [m.version for m in migrate(conn)] == [m.version for m in available() if m.version >= 10]
        assert relkind(conn) == "p"
        (legacy,) = partitions.partitions(conn)
        assert legacy.name == "predictions_legacy" and legacy.low is None
        assert snapshot(conn, columns=old_columns) == before and len(before) == 100  # every row, every value
        assert conn.execute(f"SELECT {old_annotation_columns} FROM annotations ORDER BY id").fetchall() == annotations
        states = conn.execute("SELECT count(*) FROM review_state s JOIN predictions p ON p.id = s.prediction_id")
        assert states.fetchone() == (len(judged),)  # every reference still resolves

        after = rows_on([legacy.high.date() + timedelta(days=2)], per_day=2, seed=1)
        assert store.insert_rows(conn=conn, rows=after) == 2
        assert partitions.partitions(conn)[-1].name == f"predictions_p{legacy.high.date() + timedelta(days=2):%Y%m%d}"
        assert len(snapshot(conn)) == 102


def training_version(conn: psycopg.Connection, watermark: int) -> None:
    """A compiled training version of digits-cnn up to `watermark` (its files are not needed here)."""
    common = "'digits-cnn', 'file:///nowhere', 0, '{}', '{}'"
    conn.execute(
        f"INSERT INTO dataset_versions (id, kind, model_name, uri, rows, per_class, manifest) VALUES ({'a' * 32!r},"
        f" 'validation', {common})"
    )
    conn.execute(
        "INSERT INTO dataset_versions (id, kind, model_name, uri, rows, per_class, manifest, watermark,"
        f" validation_id) VALUES ({'b' * 32!r}, 'training', {common}, %s, {'a' * 32!r})",
        (watermark,),
    )


def test_retention_drops_whole_partitions_and_keeps_what_must_outlive_them(conn: psycopg.Connection) -> None:
    days = [NOW.date() - timedelta(days=d) for d in range(39, -1, -1)]  # 40 days, the oldest first
    rows = rows_on(days, per_day=4)
    store.insert_rows(conn=conn, rows=rows)
    on = {d: [r.id for r in rows if r.created_at.date() == d] for d in days}
    old = [NOW.date() - timedelta(days=d) for d in range(31, 40)]  # partitions ending at or before the cutoff
    a, b = (create_user(conn=conn, name=n, role=Role.REVIEWER)[0] for n in ("a", "b"))

    def verdict(user: Any, item: uuid.UUID, label: str | None = None) -> int:
        kind = Verdict.WRONG if label else Verdict.CORRECT
        return record_outside(conn=conn, user=user, prediction_id=item, verdict=kind, label=label, reason="t")

    compiled = verdict(a, on[old[0]][0])  # judged, and in a training version: may go
    training_version(conn, watermark=compiled)
    not_compiled = on[old[1]][0]
    verdict(a, not_compiled)
    disputed = on[old[2]][0]
    verdict(a, disputed), verdict(b, disputed, label="x")
    leased = on[old[3]][0]
    conn.execute("INSERT INTO leases VALUES (%s, %s, now() + interval '5 minutes')", (leased, a.id))
    validation = on[old[4]][1]
    protected = {not_compiled, disputed, leased, validation}
    recent = snapshot(conn, f"created_at >= '{retention.cutoff(30, NOW).isoformat()}'")
    annotations = conn.execute("SELECT count(*) FROM annotations").fetchone()

    planned = retention.plan(conn, keep_days=30, keep={validation}, now=NOW)
    assert [p.partition.name for p in planned] == [f"predictions_p{d:%Y%m%d}" for d in old[::-1]]
    assert sum(p.rows for p in planned) == 36 and sum(p.kept for p in planned) == 4  # a dry run changes nothing
    assert len(snapshot(conn)) == 160
    retention.apply(conn, planned, keep={validation})

    stored = {r[0] for r in snapshot(conn)}
    assert protected <= stored and not (set().union(*(on[d] for d in old)) - protected) & stored
    assert snapshot(conn, f"created_at >= '{retention.cutoff(30, NOW).isoformat()}'") == recent  # nothing else
    assert conn.execute("SELECT count(*) FROM annotations").fetchone() == annotations
    names = {p.name for p in partitions.partitions(conn)}
    assert {f"predictions_k{d:%Y%m%d}" for d in (old[1], old[2], old[3], old[4])} <= names
    assert not {f"predictions_p{d:%Y%m%d}" for d in old} & names
    for item in protected:  # reachable by id, as every read finds an item
        assert store.get_prediction(conn=conn, prediction_id=item) is not None
    erase_input(conn=conn, user=a, prediction_id=leased, reason="request")  # erasure still works
    assert conn.execute("SELECT input FROM predictions WHERE id = %s", (leased,)).fetchone() == (None,)

    again = retention.plan(conn, keep_days=30, keep={validation}, now=NOW)
    assert [p.action for p in again] == ["keep"] * 4  # only protected rows left: nothing to drop
    late = rows_on([old[0]], per_day=1, seed=9)  # a late arrival for a dropped day gets its partition back
    assert store.insert_rows(conn=conn, rows=late) == 1
