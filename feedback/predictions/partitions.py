"""The prediction log's daily partitions (UTC days of `created_at`): listed with their bounds,
created ahead and on demand, one creator at a time.

A partition is `predictions_pYYYYMMDD` for one day; `predictions_kYYYYMMDD` is the same day after
retention kept only its protected rows (`feedback.predictions.retention`); `predictions_legacy` is
a table from before partitioning, covering everything before its upper bound.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg import sql

logger = logging.getLogger(__name__)

TABLE = "predictions"
AHEAD_DAYS = 7  # partitions created ahead of today
_LOCK = 0x70617274  # advisory lock: one partition creator at a time
_BOUNDS = re.compile(r"FOR VALUES FROM \((?P<low>[^)]*)\) TO \((?P<high>[^)]*)\)")

# The days known to have a partition, by database: the steady state asks the catalogue nothing.
_known: dict[str, set[date]] = {}


@dataclass(frozen=True)
class Partition:
    name: str
    low: datetime | None  # None: MINVALUE
    high: datetime

    @property
    def bound(self) -> str:
        """Its bound as `ATTACH PARTITION` takes it."""
        low = "MINVALUE" if self.low is None else f"'{self.low.isoformat()}'"
        return f"FOR VALUES FROM ({low}) TO ('{self.high.isoformat()}')"

    def covers(self, day: date) -> bool:
        start = _start(day)
        return (self.low is None or self.low <= start) and start < self.high


def _start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _instant(text: str) -> datetime | None:
    text = text.strip()
    if text == "MINVALUE":
        return None
    return datetime.fromisoformat(text.strip("'")).astimezone(UTC)


def partitions(conn: psycopg.Connection, table: str = TABLE) -> list[Partition]:
    """Every partition of `table`, oldest first."""
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'UTC'")  # the bounds are written in the session's zone
        rows = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
            (table,),
        ).fetchall()
    found = []
    for name, bound in rows:
        match = _BOUNDS.fullmatch(bound)
        if match is None:
            raise RuntimeError(f"partition {name} of {table} has a bound this code cannot read: {bound}")
        high = _instant(match["high"])
        assert high is not None
        found.append(Partition(name, _instant(match["low"]), high))
    return sorted(found, key=lambda p: p.high)


def database_key(where: psycopg.Connection | psycopg.AsyncConnection[Any] | str) -> str:
    """A database as this process names it in its caches: port and name (of a URL or conninfo, or
    of a connection to it)."""
    if isinstance(where, str):
        params = psycopg.conninfo.conninfo_to_dict(where)
        return f"{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"
    return f"{where.info.port}/{where.info.dbname}"


def ensure(conn: psycopg.Connection, days: Iterable[date], table: str = TABLE) -> list[str]:
    """A partition for each of `days` that no partition covers yet; the names created."""
    known = _known.setdefault(database_key(conn), set()) if table == TABLE else set()
    wanted = sorted(set(days) - known)
    if not wanted:
        return []
    created = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        existing = partitions(conn, table)
        for day in wanted:
            if not any(p.covers(day) for p in existing):
                name = f"{table}_p{day:%Y%m%d}"
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(name),
                        sql.Identifier(table),
                        sql.Literal(_start(day)),
                        sql.Literal(_start(day + timedelta(days=1))),
                    )
                )
                created.append(name)
    known.update(wanted)
    if created:
        logger.info("created partitions %s", ", ".join(created))
    return created


def ahead(conn: psycopg.Connection, *, days: int = AHEAD_DAYS, today: date | None = None) -> list[str]:
    """Partitions from yesterday (late arrivals) to `days` ahead of today."""
    today = today or datetime.now(UTC).date()
    return ensure(conn, (today + timedelta(days=n) for n in range(-1, days + 1)))


def days_of(instants: Iterable[datetime]) -> set[date]:
    return {i.astimezone(UTC).date() for i in instants}


def forget(conn: psycopg.Connection) -> None:
    """Forget which days are known (after partitions were dropped or replaced)."""
    _known.pop(database_key(conn), None)
