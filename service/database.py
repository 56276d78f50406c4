"""The service's one way to Postgres: every connection it opens, pooled or not, comes from here,
with the same options (autocommit: each statement its own transaction unless a `transaction()`
block says otherwise; a connect timeout; the statement timeout where one is given, past which a
statement is cancelled and the request answered 503)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

CONNECT_TIMEOUT_S = 5


def _options(statement_timeout_s: float | None, connect_timeout_s: float) -> dict[str, Any]:
    options: dict[str, Any] = {"autocommit": True, "connect_timeout": round(connect_timeout_s)}
    if statement_timeout_s is not None:
        options["options"] = f"-c statement_timeout={round(statement_timeout_s * 1000)}"
    return options


def connect(
    url: str, *, statement_timeout_s: float | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> psycopg.Connection:
    """One connection (use it in a `with` block: it is closed at the end)."""
    return psycopg.connect(url, **_options(statement_timeout_s, connect_timeout_s))


def pool(url: str, *, max_size: int, statement_timeout_s: float | None) -> ConnectionPool:
    """A pool for the review and admin routes (opened by the caller, without waiting for Postgres)."""
    return ConnectionPool(
        url, min_size=1, max_size=max_size, open=False, kwargs=_options(statement_timeout_s, CONNECT_TIMEOUT_S)
    )


def async_pool(url: str, *, max_size: int, statement_timeout_s: float | None) -> AsyncConnectionPool:
    """A pool for the data plane's lookups of stored predictions (opened by the caller)."""
    return AsyncConnectionPool(
        url, min_size=1, max_size=max_size, open=False, kwargs=_options(statement_timeout_s, CONNECT_TIMEOUT_S)
    )
