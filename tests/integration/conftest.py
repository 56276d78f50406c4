"""Helpers to run the real service in a subprocess; every process started here is stopped here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness import ROOT, free_port, spawn, stop

__all__ = ["ROOT", "RunningService", "start_ingest", "start_service"]


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_ingest(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `loop ingest` processes; all are stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**overrides: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **service_env, **overrides}
        process = spawn([sys.executable, "-m", "service", "ingest"], env=env, log=tmp_path / "ingest.log")
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            stop(process, timeout_s=30)


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
        process = spawn(command, env=env, log=log)
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
            stop(process, timeout_s=30)
