"""`loop serve` for a benchmark or an experiment: a model, a database, a key prefix, a free port."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from harness.processes import free_port, running

LOOP_SERVE = [sys.executable, "-m", "service", "serve", "--no-train"]


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that starts `loop serve`: the model and the servers it logs to."""
    parser.add_argument("--model", default="digits-cnn:latest")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def loop_serve(
    model: str,
    *,
    database_url: str,
    redis_url: str,
    prefix: str,
    var_dir: Path,
    log: Path,
    overrides: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """`loop serve` of `model` (`name:version`; its ingest worker included) on a free port, with
    `overrides` on top of its settings; yields its base URL and stops it with its family."""
    port = free_port()
    name, _, version = model.partition(":")
    env = {
        "LOOP_MODEL_NAME": name,
        "LOOP_MODEL_TAG": version or "latest",
        "LOOP_DATABASE_URL": database_url,
        "LOOP_REDIS_URL": redis_url,
        "LOOP_REDIS_PREFIX": prefix,
        "LOOP_INGEST_METRICS_PORT": "0",
        "LOOP_VAR_DIR": str(var_dir),
        "LOOP_PORT": str(port),
        **(overrides or {}),
    }
    with running(LOOP_SERVE, env, ready_url=f"http://127.0.0.1:{port}/readyz", log=log):
        yield f"http://127.0.0.1:{port}"
