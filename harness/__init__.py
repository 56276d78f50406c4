"""What tests, benchmarks, experiments and the fault runner share to run the real thing: a free
port, a throwaway database and Redis key prefix, and a server process started, awaited and stopped
with every process it started.

- `processes`: free ports; start a command in a process group of its own and wait until it
  answers; stop (or kill -9) it and its whole family, however the run ends.
- `scratch`: a new database on a Postgres server and a new key prefix on a Redis, removed after.
- `serve`: `loop serve` on a free port, pointed at a model, a database and a key prefix.
- `embedded`: a Postgres and a Redis of their own in a folder, on free ports, to stop and restart.
"""

from harness.processes import ROOT, family, free_port, kill, running, spawn, start, stop
from harness.scratch import (
    create_database,
    delete_keys,
    drop_database,
    key_prefix,
    new_prefix,
    on_database,
    throwaway,
    throwaway_database,
)
from harness.serve import LOOP_SERVE, add_loop_options, loop_serve

__all__ = [
    "LOOP_SERVE",
    "ROOT",
    "add_loop_options",
    "create_database",
    "delete_keys",
    "drop_database",
    "family",
    "free_port",
    "key_prefix",
    "kill",
    "loop_serve",
    "new_prefix",
    "on_database",
    "running",
    "spawn",
    "start",
    "stop",
    "throwaway",
    "throwaway_database",
]
