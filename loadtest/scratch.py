"""Throwaway databases and Redis key prefixes for benchmarks, removed afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
import redis
from psycopg import sql


def create_database(server: str) -> tuple[str, str]:
    """A new, empty database on `server` (a URL without a database): its name and URL."""
    name = f"loop_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, f"{server}/{name}"


def drop_database(server: str, name: str) -> None:
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def new_prefix() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix`."""
    client = redis.Redis.from_url(redis_url)
    try:
        stale = list(client.scan_iter(match=f"{prefix}:*"))
        if stale:
            client.delete(*stale)
    finally:
        client.close()


@contextlib.contextmanager
def throwaway(server: str, redis_url: str) -> Iterator[tuple[str, str]]:
    """A new database on `server` and a new key prefix: (database URL, prefix); both removed after."""
    name, url = create_database(server)
    prefix = new_prefix()
    try:
        yield url, prefix
    finally:
        drop_database(server, name)
        delete_keys(redis_url, prefix)
