"""Helpers to run the real service in a subprocess; every process started here is stopped here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def _family(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The process's descendants: `loop serve` starts its children in sessions of their own."""
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(process: subprocess.Popen[bytes]) -> None:
    family = _family(process)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Whatever outlived its parent is stopped too: a test leaves no process behind.
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped (or killed) as a whole
        )


def kill(process: subprocess.Popen[bytes]) -> None:
    """kill -9 the process and everything it started."""
    family = _family(process)
    os.killpg(process.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=10)
    psutil.wait_procs(family, timeout=10)


@pytest.fixture
def start_ingest(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `loop ingest` processes; all are stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**overrides: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **service_env, **overrides}
        process = _start([sys.executable, "-m", "service", "ingest"], env, tmp_path / "ingest.log")
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            _stop(process)


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Start `loop serve` (or plain `bentoml serve`) on a free port; waits for /readyz unless told not to."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        wait_ready: bool = True, via_cli: bool = True, without: tuple[str, ...] = (), **overrides: str
    ) -> RunningService:
        port = free_port()
        bentoml = Path(sys.executable).with_name("bentoml")
        command = (
            [sys.executable, "-m", "service", "serve", "--no-train"]
            if via_cli
            else [str(bentoml), "serve", "service.app:Predictor", "--port", str(port), "--host", "127.0.0.1"]
        )
        env = {**os.environ, **service_env, "LOOP_PORT": str(port), "LOOP_HOST": "127.0.0.1", **overrides}
        for key in without:
            env.pop(key, None)
        log = tmp_path / f"serve-{port}.log"
        process = _start(command, env, log)
        started.append(process)
        service = RunningService(url=f"http://127.0.0.1:{port}", process=process, log=log)
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"service exited early:\n{service.logs()}"
            assert time.monotonic() < deadline, f"service did not come up:\n{service.logs()}"
            try:
                status = httpx.get(f"{service.url}/readyz", timeout=1).status_code
            except httpx.TransportError:
                status = None
            if status == 200 or (status is not None and not wait_ready):
                return service
            time.sleep(0.2)

    try:
        yield start
    finally:
        for process in started:
            _stop(process)
