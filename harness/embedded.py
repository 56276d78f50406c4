"""A Postgres and a Redis of a run's own, in a folder, on free ports: to stop, crash and restart
(the fault runner) or to run on without the machine's servers (the loop demo). They are the
service's own embedded servers (`service.embedded`), the ones `loop serve` starts by itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from harness.processes import free_port

if TYPE_CHECKING:
    from service.embedded import EmbeddedPostgres, EmbeddedRedis


@contextlib.contextmanager
def postgres(folder: Path) -> Iterator[EmbeddedPostgres]:
    """A Postgres cluster in `folder` on a free port, started (its URL is `.url`); stopped after."""
    from service.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis(folder: Path) -> Iterator[EmbeddedRedis]:
    """A `redis-server` with its data in `folder` on a free port, started (`.url`); stopped after."""
    from service.embedded import EmbeddedRedis

    server = EmbeddedRedis(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
