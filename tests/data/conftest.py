"""Fixtures of the data tests."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's own database (compiles open their own transactions)."""
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c
