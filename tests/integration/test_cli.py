"""The `loop` command line against a real database."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from feedback import review_store

pytestmark = pytest.mark.integration


def loop(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOOP_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_users_add_prints_a_working_token_once(database_url: str) -> None:
    created = loop("users", "add", "alice", "--role", "admin", database_url=database_url)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert len(token) >= 40
    with psycopg.connect(database_url) as conn:
        user = review_store.authenticate(conn=conn, token=token)
        stored = conn.execute("SELECT token_hash FROM users WHERE name = 'alice'").fetchone()
    assert user is not None and user.role is review_store.Role.ADMIN
    assert stored is not None and token.encode() not in bytes(stored[0])  # only the hash is kept
    again = loop("users", "add", "alice", database_url=database_url)
    assert again.returncode != 0 and "exists" in again.stderr
    listed = loop("users", "list", database_url=database_url)
    assert "alice\tadmin" in listed.stdout


def test_migrate_is_idempotent(database_url: str) -> None:
    result = loop("migrate", database_url=database_url)
    assert result.returncode == 0 and "up to date" in result.stdout
