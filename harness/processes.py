"""Server processes for tests, benchmarks and experiments: started in a process group of their own,
awaited until they answer, and stopped with everything they started, also when a run fails.

`loop serve` starts its children (BentoML's arbiter and workers, the ingest worker) in sessions of
their own, so stopping the process group is not enough: whatever of the family outlives its parent
is stopped too, and a run leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent  # the repository: commands run from here


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def family(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The process's descendants, wherever their sessions are."""
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def spawn(command: list[str], *, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Run `command` from the repository root with `env` as its whole environment, output appended
    to `log`, in a process group of its own (stopped, or killed, as a whole)."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, cwd=ROOT, env=dict(env), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def start(
    command: list[str], env: Mapping[str, str], *, ready_url: str, log: Path, timeout_s: float = 120
) -> subprocess.Popen[bytes]:
    """`spawn` with this environment plus `env`, then wait until `ready_url` answers 200. If it
    exits or is not ready within `timeout_s`, it is stopped with its family and SystemExit says so;
    so it is if the wait is interrupted."""
    process = spawn(command, env={**os.environ, **env}, log=log)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    return process
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{command[0]} did not become ready at {ready_url}; see {log}")
            time.sleep(0.2)
    except BaseException:
        stop(process)
        raise


def stop(process: subprocess.Popen[bytes], *, timeout_s: float = 60) -> None:
    """SIGTERM the process group, SIGKILL it if it has not gone within `timeout_s`; then whatever
    of its family outlived it is terminated, and killed if it lingers."""
    descendants = family(process)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=20)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def kill(process: subprocess.Popen[bytes]) -> None:
    """kill -9 the process and everything it started, as a crash would."""
    descendants = family(process)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=10)
    psutil.wait_procs(descendants, timeout=10)


@contextlib.contextmanager
def running(
    command: list[str],
    env: Mapping[str, str],
    *,
    ready_url: str,
    log: Path,
    start_timeout_s: float = 120,
    stop_timeout_s: float = 60,
) -> Iterator[subprocess.Popen[bytes]]:
    """`start`, then `stop` on the way out, however the block ends."""
    process = start(command, env, ready_url=ready_url, log=log, timeout_s=start_timeout_s)
    try:
        yield process
    finally:
        stop(process, timeout_s=stop_timeout_s)
