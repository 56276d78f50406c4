"""Nothing a client was answered may be lost or doubled: the real service and ingest workers in
subprocesses, with workers killed and servers stopped in the middle of traffic. Every test
compares the ids clients received with the ids in Postgres."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from feedback.migrate import migrate
from harness import free_port, kill
from models import digits
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

DATA = digits.load()


class Traffic:
    """Clients sending predictions in threads; keeps every id they were answered with."""

    def __init__(self, url: str, threads: int = 6, per_request: int = 10) -> None:
        self.url = url
        self.threads = threads
        self.per_request = per_request
        self.ids: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def send(self, predictions: int) -> None:
        requests = predictions // self.per_request

        def client(worker: int) -> None:
            with httpx.Client(base_url=self.url, timeout=30) as http:
                for i in range(worker, requests, self.threads):
                    k = (i * self.per_request) % (len(DATA.labels) - self.per_request)
                    samples = DATA.images[k : k + self.per_request].tolist()
                    try:
                        response = http.post("/predict", json={"samples": samples})
                    except httpx.HTTPError as exc:
                        with self._lock:
                            self.failures.append(repr(exc))
                        continue
                    with self._lock:
                        if response.status_code == 200:
                            self.ids += [p["id"] for p in response.json()["predictions"]]
                        else:
                            self.failures.append(f"{response.status_code} {response.text}")

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(client, range(self.threads)))

    def in_background(self, predictions: int) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(predictions,), daemon=True)
        thread.start()
        return thread


def metric_sum(text: str, name: str, label: str) -> float:
    """Sum of a Prometheus metric's samples that carry `label`."""
    pattern = re.compile(rf"^{name}\{{([^}}]*)\}} (\S+)$", re.M)
    return sum(float(m.group(2)) for m in pattern.finditer(text) if label in m.group(1))


def stored(database_url: str) -> list[str]:
    with psycopg.connect(database_url, connect_timeout=3) as conn:
        return [str(row[0]) for row in conn.execute("SELECT id FROM predictions")]


def wait_until_stored(database_url: str, expected: list[str], timeout_s: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ids = stored(database_url)
        except psycopg.OperationalError:
            ids = []
        if len(ids) >= len(expected) or time.monotonic() > deadline:
            return ids
        time.sleep(0.25)


def assert_exactly_once(received: list[str], in_postgres: list[str]) -> None:
    assert len(set(received)) == len(received), "the service answered an id twice"
    assert len(in_postgres) == len(set(in_postgres))
    missing = set(received) - set(in_postgres)
    extra = set(in_postgres) - set(received)
    assert not missing, f"{len(missing)} answered predictions were lost"
    assert not extra, f"{len(extra)} stored predictions were never answered"


@pytest.mark.parametrize("objects", [False, True], ids=["inputs-in-postgres", "inputs-in-the-object-store"])
def test_kill_9_of_the_ingest_worker_mid_stream(
    start_service: Callable[..., RunningService],
    start_ingest: Callable[..., subprocess.Popen[bytes]],
    database_url: str,
    service_env: dict[str, str],
    objects: bool,
) -> None:
    # With every input in the object store, a worker killed between writing objects and their rows
    # leaves entries pending; whoever claims them writes the same objects again (named by content).
    store = {"LOOP_BLOB_MIN_BYTES": "1"} if objects else {}
    service = start_service(**store)
    tuning = {"LOOP_INGEST_BATCH_SIZE": "100", "LOOP_INGEST_CLAIM_IDLE_MS": "1000", **store}
    first = start_ingest(**tuning)
    traffic = Traffic(service.url)
    sender = traffic.in_background(5000)
    deadline = time.monotonic() + 60
    while len(stored(database_url)) < 1000:  # the worker is well into the stream
        assert time.monotonic() < deadline, "the first worker stored nothing"
        time.sleep(0.05)
    kill(first)
    start_ingest(**tuning)
    sender.join(timeout=120)
    assert not traffic.failures
    assert len(traffic.ids) == 5000
    assert_exactly_once(traffic.ids, wait_until_stored(database_url, traffic.ids))
    if objects:  # every row's object is there, and every object is some row's: no orphan
        folder = Path(service_env["LOOP_VAR_DIR"]) / "blobs"
        written = {p.name for p in folder.rglob("*") if p.is_file() and p.suffix != ".part"}  # .part: swept
        with psycopg.connect(database_url) as conn:
            named = {r[0] for r in conn.execute("SELECT input_sha256 FROM predictions WHERE input IS NULL")}
            assert conn.execute("SELECT count(*) FROM predictions WHERE input_key IS NULL").fetchone() == (0,)
        assert named == written, (len(named), len(written), sorted(written - named)[:3])


def test_redis_outage_during_traffic(
    start_service: Callable[..., RunningService],
    start_ingest: Callable[..., subprocess.Popen[bytes]],
    database_url: str,
    tmp_path: Path,
) -> None:
    redis_server = EmbeddedRedis(tmp_path / "redis", free_port())
    try:
        url = redis_server.start()
        service = start_service(LOOP_REDIS_URL=url)
        start_ingest(LOOP_REDIS_URL=url)
        traffic = Traffic(service.url, threads=2)
        traffic.send(500)
        redis_server.stop()
        traffic.send(1000)  # answered while Redis is down: spooled
        assert list((tmp_path / "var" / "spool").glob("*.spool")), "nothing was spooled"
        redis_server.start()
        traffic.send(500)
        assert not traffic.failures, traffic.failures[:3]
        assert_exactly_once(traffic.ids, wait_until_stored(database_url, traffic.ids))
        metrics = httpx.get(f"{service.url}/metrics").text
        spooled = metric_sum(metrics, "loop_log_records_total", 'event="spooled"')
        # At least the outage's records; a few more while the reconnect back-off ran out.
        assert spooled >= 1000
        assert metric_sum(metrics, "loop_log_records_total", 'event="replayed"') == spooled
    finally:
        redis_server.stop()


def test_kill_9_of_the_service_after_it_answered(
    start_service: Callable[..., RunningService],
    start_ingest: Callable[..., subprocess.Popen[bytes]],
    database_url: str,
    tmp_path: Path,
) -> None:
    redis_server = EmbeddedRedis(tmp_path / "redis", free_port())
    try:
        url = redis_server.start()
        service = start_service(LOOP_REDIS_URL=url)
        start_ingest(LOOP_REDIS_URL=url)
        traffic = Traffic(service.url, threads=2)
        traffic.send(300)  # in the stream
        redis_server.stop()
        traffic.send(300)  # only in the dead worker's spool
        kill(service.process)
        redis_server.start()
        start_service(LOOP_REDIS_URL=url)  # a new worker replays the spool the dead one left
        assert not traffic.failures, traffic.failures[:3]
        assert_exactly_once(traffic.ids, wait_until_stored(database_url, traffic.ids))
    finally:
        redis_server.stop()


def test_postgres_outage_during_traffic(
    start_service: Callable[..., RunningService],
    start_ingest: Callable[..., subprocess.Popen[bytes]],
    shared_tmp: Path,
) -> None:
    postgres = EmbeddedPostgres(shared_tmp / "pg", free_port())
    try:
        url = postgres.start()
        with psycopg.connect(url) as conn:
            migrate(conn)
        service = start_service(LOOP_DATABASE_URL=url)
        start_ingest(LOOP_DATABASE_URL=url)
        traffic = Traffic(service.url, threads=2)
        traffic.send(500)
        postgres.stop("immediate")
        traffic.send(1000)  # serving goes on without Postgres
        time.sleep(1)
        postgres.start()
        traffic.send(500)
        assert not traffic.failures, traffic.failures[:3]
        assert_exactly_once(traffic.ids, wait_until_stored(url, traffic.ids))
    finally:
        postgres.stop()


def test_embedded_servers_start_stop_and_keep_data(
    start_service: Callable[..., RunningService], shared_tmp: Path
) -> None:
    env = {
        "LOOP_VAR_DIR": str(shared_tmp / "embedded-var"),
        "LOOP_EMBEDDED_POSTGRES_PORT": str(free_port()),
        "LOOP_EMBEDDED_REDIS_PORT": str(free_port()),
    }
    without = ("LOOP_DATABASE_URL", "LOOP_REDIS_URL")
    service = start_service(without=without, **env)
    traffic = Traffic(service.url, threads=1, per_request=5)
    traffic.send(20)
    assert not traffic.failures and len(traffic.ids) == 20

    def ingested(url: str, prediction_id: str) -> bool:
        response = httpx.get(f"{url}/predictions/{prediction_id}", timeout=10)
        return response.status_code == 200 and bool(response.json()["ingested"])

    deadline = time.monotonic() + 60
    while not all(ingested(service.url, i) for i in traffic.ids):
        assert time.monotonic() < deadline, "the embedded ingest worker stored nothing"
        time.sleep(0.25)

    service.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert service.process.wait(timeout=60) == 0, service.logs()
    data_dir = str(shared_tmp / "embedded-var")
    leftovers = subprocess.run(["pgrep", "-f", data_dir], capture_output=True, text=True, check=False).stdout.split()
    assert [p for p in leftovers if int(p) != os.getpid()] == [], "a server outlived Ctrl-C"

    again = start_service(without=without, **env)
    assert all(ingested(again.url, i) for i in traffic.ids), "data did not survive the restart"
