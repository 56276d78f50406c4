"""Throwaway databases and Redis key prefixes: each run, test or benchmark gets its own on the
machine's servers (or any other), so none sees another's data; both are removed afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import redis
from psycopg import sql


def on_database(server: str, name: str) -> str:
    """The URL (or conninfo string) of database `name` on the server `server` points at; `server`
    may name a database of its own (`postgresql://host:5432/loop`) or none (`postgresql://host:5432`)."""
    if "://" in server:
        return urlsplit(server)._replace(path=f"/{name}").geturl()
    return psycopg.conninfo.make_conninfo(server, dbname=name)


def create_database(server: str, *, kind: str = "bench", name: str | None = None) -> tuple[str, str]:
    """A new, empty database on `server` (`loop_<kind>_<random>` unless named): its name and URL."""
    name = name or f"loop_{kind}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(on_database(server, "postgres"), autocommit=True, connect_timeout=10) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, on_database(server, name)


def drop_database(server: str, name: str) -> None:
    """Drop database `name` on `server`, whoever is still connected to it."""
    with psycopg.connect(on_database(server, "postgres"), autocommit=True, connect_timeout=10) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def throwaway_database(server: str, *, kind: str = "bench") -> Iterator[str]:
    """A new database on `server`: its URL; dropped afterwards, however the block ends."""
    name, url = create_database(server, kind=kind)
    try:
        yield url
    finally:
        drop_database(server, name)


def new_prefix(kind: str = "bench") -> str:
    """A Redis key prefix no one else uses: `<kind>-<random>`."""
    return f"{kind}-{uuid.uuid4().hex[:12]}"


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix`; nothing to do if the server is gone (a throwaway one)."""
    client = redis.Redis.from_url(redis_url)
    try:
        stale = list(client.scan_iter(match=f"{prefix}:*"))
        if stale:
            client.delete(*stale)
    except redis.ConnectionError:
        pass
    finally:
        client.close()


@contextlib.contextmanager
def key_prefix(redis_url: str, *, kind: str = "bench") -> Iterator[str]:
    """A new key prefix; its keys are deleted afterwards."""
    prefix = new_prefix(kind)
    try:
        yield prefix
    finally:
        delete_keys(redis_url, prefix)


@contextlib.contextmanager
def throwaway(server: str, redis_url: str, *, kind: str = "bench") -> Iterator[tuple[str, str]]:
    """A new database on `server` and a new key prefix: (database URL, prefix); both removed after."""
    with throwaway_database(server, kind=kind) as url, key_prefix(redis_url, kind=kind) as prefix:
        yield url, prefix
