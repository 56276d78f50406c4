"""Start a server for a benchmark, wait until it answers, stop it with everything it started."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(command: list[str], env: dict[str, str], *, ready_url: str, log: Path) -> subprocess.Popen[bytes]:
    """Run `command` (in its own process group, output to `log`) until `ready_url` answers 200."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise SystemExit(f"{command[0]} did not become ready at {ready_url}; see {log}")
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group; SIGKILL it if it has not gone after a minute."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], *, ready_url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`start`, then `stop` on the way out, however the block ends."""
    process = start(command, env, ready_url=ready_url, log=log)
    try:
        yield process
    finally:
        stop(process)


LOOP_SERVE = [sys.executable, "-m", "service", "serve", "--no-train"]


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that starts `loop serve`: the model and the servers it logs to."""
    parser.add_argument("--model", default="digits-cnn:latest")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def loop_serve(
    model: str, *, database_url: str, redis_url: str, prefix: str, var_dir: Path, log: Path,
    overrides: Mapping[str, str] | None = None,
) -> Iterator[str]:  # fmt: skip
    """`loop serve` of `model` (its ingest worker included) on a free port; yields its base URL."""
    port = free_port()
    name, _, version = model.partition(":")
    env = {
        "LOOP_MODEL_NAME": name, "LOOP_MODEL_TAG": version or "latest", "LOOP_DATABASE_URL": database_url,
        "LOOP_REDIS_URL": redis_url, "LOOP_REDIS_PREFIX": prefix, "LOOP_INGEST_METRICS_PORT": "0",
        "LOOP_VAR_DIR": str(var_dir), "LOOP_PORT": str(port), **(overrides or {}),
    }  # fmt: skip
    with running(LOOP_SERVE, env, ready_url=f"http://127.0.0.1:{port}/readyz", log=log):
        yield f"http://127.0.0.1:{port}"
