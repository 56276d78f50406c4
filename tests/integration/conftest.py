"""Helpers to run the real service in a subprocess; every process started here is stopped here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from harness import ROOT, free_port, spawn, stop
from tests.conftest import REDIS, fresh_database, redis_namespace

__all__ = ["ROOT", "RunningService", "launch", "shared_service", "start_ingest", "start_service"]


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


def launch(
    base_env: dict[str, str],
    log_dir: Path,
    *,
    wait_ready: bool = True,
    via_cli: bool = True,
    without: tuple[str, ...] = (),
    **overrides: str,
) -> RunningService:
    """Start `loop serve` (or plain `bentoml serve`) on a free port; waits for /readyz unless told
    not to. The caller stops `.process`."""
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    command = (
        [sys.executable, "-m", "service", "serve", "--no-train"]
        if via_cli
        else [str(bentoml), "serve", "service.app:Predictor", "--port", str(port), "--host", "127.0.0.1"]
    )
    env = {**os.environ, **base_env, "LOOP_PORT": str(port), "LOOP_HOST": "127.0.0.1", **overrides}
    for key in without:
        env.pop(key, None)
    log = log_dir / f"serve-{port}.log"
    process = spawn(command, env=env, log=log)
    service = RunningService(url=f"http://127.0.0.1:{port}", process=process, log=log)
    deadline = time.monotonic() + 90
    try:
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
    except BaseException:
        stop(process, timeout_s=30)
        raise


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., RunningService]]:
    """Start `loop serve` (or plain `bentoml serve`) on a free port; waits for /readyz unless told not to."""
    started: list[RunningService] = []

    def start(**options: Any) -> RunningService:
        service = launch(service_env, tmp_path, **options)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            stop(service.process, timeout_s=30)


@pytest.fixture(scope="module")
def shared_service(
    model_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningService]]:
    """A service for a whole module, one per set of settings, started on first use: for tests that
    only send it requests that change nothing it keeps (limits, refusals). Its database and key
    prefix are the module's own."""
    log_dir = tmp_path_factory.mktemp("shared-service")
    running: dict[tuple[tuple[str, str], ...], RunningService] = {}
    with fresh_database() as database_url, redis_namespace() as keys:
        base = {
            **model_env,
            "LOOP_DATABASE_URL": database_url,
            "LOOP_REDIS_URL": REDIS,
            "LOOP_REDIS_PREFIX": keys.prefix,
            "LOOP_VAR_DIR": str(log_dir / "var"),
        }

        def get(**overrides: str) -> RunningService:
            key = tuple(sorted(overrides.items()))
            if key not in running:
                running[key] = launch(base, log_dir, **cast(Any, overrides))
            return running[key]

        try:
            yield get
        finally:
            for service in running.values():
                stop(service.process, timeout_s=30)
