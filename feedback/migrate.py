"""Versioned schema migrations: ordered plain SQL files, each applied once in its own transaction."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x6C6F6F70  # advisory lock: one migrator at a time


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for entry in resources.files("feedback.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def migrate(conn: psycopg.Connection, *, up_to: int | None = None) -> list[Migration]:
    """Apply every migration not yet applied (up to version `up_to`, if given); returns those applied now."""
    conn.autocommit = True
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
    try:
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied = []
        for migration in available():
            if migration.version in done or (up_to is not None and migration.version > up_to):
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            logger.info("applied migration %04d_%s", migration.version, migration.name)
            applied.append(migration)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
