"""Faults under load: predicting clients and reviewers at once (locust), and a fault in the middle
of it. After each, every prediction id a client received must be stored exactly once, every
verdict a reviewer got a 200 for must be in Postgres, and the service must answer again by itself.

    python -m loadtest.faults                       # every fault, 30 s of load each
    python -m loadtest.faults --fault ingest --seconds 60 --users 24

The faults: `worker` (kill -9 of a BentoML service worker: its arbiter starts another), `ingest`
(kill -9 of the ingest worker: `loop serve` starts another), `postgres` (an immediate shutdown, as
in a crash, then a start 3 s later) and `redis` (a restart 3 s later). Each runs on a throwaway
Postgres and Redis of its own, with `loop serve` (ingest worker included) on a free port; the model
is the one the environment names (`LOOP_MODEL_NAME`, `LOOP_MODEL_TAG`), so train one first.
Prints one line of figures per fault and writes them as JSON to `--out`.

Everything is driven from outside, as an operator would: `loop serve` and `loop users add` run as
commands, the reviewers are made over HTTP, the faults are signals and server restarts, and what
was stored is read from the run's own Postgres.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
import psycopg

import harness
from harness import embedded
from loadtest.samples import served_model, zeros

logger = logging.getLogger("faults")
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
FAULTS = ("worker", "ingest", "postgres", "redis")
REVIEWERS = 3
OUTAGE_S = 3.0  # how long Postgres or Redis stays down


@dataclass(frozen=True)
class Figures:
    """One fault's run, in predictions (samples) and verdicts."""

    fault: str
    sent: int  # predictions in the requests sent
    answered: int  # prediction ids the clients received
    stored: int  # of those, in Postgres once the run was over
    lost: int  # answered but not stored: must be 0
    doubled: int  # answered or stored twice: must be 0
    stored_unanswered: int  # stored, but the answer never reached the client (cut off by the fault)
    shadowed: int  # shadow predictions stored (a shadow saw every request; one a prediction at most)
    shadow_orphans: int  # shadow predictions of no stored prediction: must be 0
    verdicts: int  # verdicts answered 200
    verdicts_lost: int  # answered 200 but not in Postgres: must be 0
    failed_requests: int  # requests of any kind that failed (refused while a server was down, cut off)
    failed_predictions: int  # of those, requests for predictions
    requests: int
    recovered_s: float  # from the fault until predictions and reviews are both answered again

    @property
    def kept(self) -> bool:
        return self.lost == 0 and self.doubled == 0 and self.verdicts_lost == 0 and self.answered > 0

    def line(self) -> str:
        return (
            f"{self.fault:8s} sent {self.sent:6d}  answered {self.answered:6d}  stored {self.stored:6d}  "
            f"lost {self.lost}  doubled {self.doubled}  cut off {self.stored_unanswered:3d}  "
            f"shadowed {self.shadowed:6d} (orphans {self.shadow_orphans})  "
            f"verdicts {self.verdicts:5d} (lost {self.verdicts_lost})  "
            f"failed {self.failed_requests:4d}/{self.requests} requests ({self.failed_predictions} predicting)  "
            f"recovered in {self.recovered_s:.1f} s"
        )


class Servers:
    """A throwaway Postgres and Redis, and `loop serve` on them; all stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.admin: dict[str, str] = {}  # an admin's Authorization header, once `reviewers` made one
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Servers:
        with contextlib.ExitStack() as stack:  # what started is stopped if the rest does not come up
            self.postgres = stack.enter_context(embedded.postgres(self.folder / "postgres"))
            self.redis = stack.enter_context(embedded.redis(self.folder / "redis"))
            self.database_url = self.postgres.url
            env = {
                **self.env,
                "LOOP_DATABASE_URL": self.database_url,
                "LOOP_REDIS_URL": self.redis.url,
                "LOOP_PORT": str(self.port),
                "LOOP_HOST": "127.0.0.1",
                "LOOP_VAR_DIR": str(self.folder / "var"),
                "LOOP_INGEST_METRICS_PORT": "0",
                "BENTOML_DO_NOT_TRACK": "True",
            }
            self.serve = stack.enter_context(
                harness.running(harness.LOOP_SERVE, env, ready_url=f"{self.url}/readyz", log=self.folder / "serve.log")
            )
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()  # `loop serve` and its family, then Redis, then Postgres

    def processes(self, marker: str) -> list[psutil.Process]:
        return [p for p in harness.family(self.serve) if marker in " ".join(_cmdline(p))]

    def reviewers(self, count: int) -> tuple[list[int], list[str]]:
        """`count` reviewers, made by an admin over HTTP (the admin by `loop users add`): ids, tokens."""
        command = [sys.executable, "-m", "service", "users", "add", "faults-admin", "--role", "admin"]
        env = {**os.environ, **self.env, "LOOP_DATABASE_URL": self.database_url}
        made = subprocess.run(command, cwd=harness.ROOT, env=env, capture_output=True, text=True, check=True)
        admin = {"Authorization": f"Bearer {made.stdout.split()[-1]}"}
        self.admin = admin
        ids, tokens = [], []
        with httpx.Client(base_url=self.url, headers=admin, timeout=10) as client:
            for i in range(count):
                answer = client.post("/review/users", json={"name": f"reviewer-{i}", "role": "reviewer"})
                answer.raise_for_status()
                ids.append(int(answer.json()["id"]))
                tokens.append(str(answer.json()["token"]))
        return ids, tokens

    def shadow(self) -> None:
        """The served model shadowing itself for every request (its own version: the same work)."""
        model = httpx.get(f"{self.url}/models", timeout=10).json()["models"][0]
        body = {"version": model["version"], "share": 1.0}
        started = httpx.post(f"{self.url}/admin/shadow", json=body, headers=self.admin, timeout=10)
        started.raise_for_status()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _kill(processes: list[psutil.Process], what: str) -> None:
    if not processes:
        raise RuntimeError(f"no {what} process to kill")
    for process in processes:
        logger.info("kill -9 %s (pid %d)", what, process.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def inject(fault: str, servers: Servers) -> None:
    """Cause the fault; returns once it is over (a killed process is left to its supervisor)."""
    if fault == "worker":
        _kill(servers.processes("_bentoml_impl.worker"), "service worker")
    elif fault == "ingest":
        _kill(servers.processes("service ingest"), "ingest worker")
    elif fault == "postgres":
        servers.postgres.stop("immediate")
        time.sleep(OUTAGE_S)
        servers.postgres.start()
    elif fault == "redis":
        servers.redis.stop()
        time.sleep(OUTAGE_S)
        servers.redis.start()
    else:
        raise ValueError(f"unknown fault {fault!r}; faults are {', '.join(FAULTS)}")


def _recovered_after(
    servers: Servers, token: str, probe_sample: object, since: float, deadline: float
) -> tuple[float, set[str]]:
    """Seconds from `since` until a prediction (of `probe_sample`) is answered and then stored in
    Postgres, and a reviewer's call is answered; and the ids of the probes' predictions."""
    reviewer = {"Authorization": f"Bearer {token}"}
    probes: set[str] = set()
    with httpx.Client(base_url=servers.url, timeout=5) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                predicted = client.post("/predict", json={"samples": [probe_sample], "tags": {"source": "probe"}})
                if predicted.status_code == 200:
                    probe = predicted.json()["predictions"][0]["id"]
                    probes.add(probe)
                    while time.monotonic() < deadline:
                        found = client.get(f"/predictions/{probe}")
                        if found.status_code == 200 and found.json()["ingested"]:
                            break
                        time.sleep(0.1)
                    if client.get("/review/counts", headers=reviewer).status_code == 200:
                        return time.monotonic() - since, probes
            time.sleep(0.1)
    raise RuntimeError(f"the service did not recover within {deadline - since:.0f} s")


def _locust(servers: Servers, tokens: list[str], users: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        servers.url,
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{int(seconds)}s",
        "--csv",
        str(out / "locust"),
        "--only-summary",
        "--stop-timeout",
        "10",
        f"--reviewer-token={','.join(tokens)}",
        "--predict-weight",
        "3",
        "--review-weight",
        "1",
        "--admin-weight",
        "0",
        "--ids-file",
        str(out / "ids.txt"),
        "--verdicts-file",
        str(out / "verdicts.txt"),
        "--sent-file",
        str(out / "sent.txt"),
    ]
    return harness.spawn(command, env=os.environ, log=out / "locust.log")


def _requests(out: Path) -> tuple[int, int, int, int]:
    """(predictions sent, requests, failed requests, failed prediction requests): the first as the
    users counted them, the others from locust's statistics."""
    sent = sum(int(n) for n in (out / "sent.txt").read_text().split())
    with (out / "locust_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    predicting = sum(int(row["Failure Count"]) for name, row in rows.items() if name.startswith("/predict"))
    total = rows["Aggregated"]
    return sent, int(total["Request Count"]), int(total["Failure Count"]), predicting


def _shadowed(database_url: str) -> tuple[int, int]:
    """Shadow predictions stored, and those of no stored prediction."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM predictions p"
            " WHERE p.created_at = sp.created_at AND p.id = sp.prediction_id)) FROM shadow_predictions sp"
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _stored(database_url: str, ids: set[str], timeout_s: float) -> tuple[dict[str, int], set[tuple[str, int, str]]]:
    """Every stored prediction id with its count, once all of `ids` are in (or `timeout_s` passed),
    and every (prediction id, user id, verdict) annotation."""
    deadline = time.monotonic() + timeout_s
    while True:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            counts = {
                str(row[0]): int(row[1])
                for row in conn.execute("SELECT id, count(*) FROM predictions WHERE source = 'model' GROUP BY id")
            }
            annotations = {
                (str(row[0]), int(row[1]), str(row[2]))
                for row in conn.execute("SELECT prediction_id, actor_id, verdict FROM annotations")
            }
        if ids <= counts.keys() or time.monotonic() > deadline:
            return counts, annotations
        time.sleep(0.5)


def run(
    fault: str, *, seconds: float = 30, users: int = 12, env: dict[str, str] | None = None, folder: Path | None = None
) -> Figures:
    """One fault under load, on servers of its own; every process started here is stopped here."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"loop-fault-{fault}-")))
            folder.chmod(0o755)  # an embedded Postgres run as its own user must traverse it
        out = folder / "locust"
        out.mkdir(parents=True, exist_ok=True)
        servers = stack.enter_context(Servers(folder, env or {}))
        user_ids, tokens = servers.reviewers(REVIEWERS)
        servers.shadow()
        probe_sample = zeros(served_model(servers.url))
        locust = _locust(servers, tokens, users, seconds, out)
        stack.callback(harness.stop, locust)
        time.sleep(seconds / 3)  # traffic and reviews under way
        logger.info("%s: injecting the fault", fault)
        began = time.monotonic()
        inject(fault, servers)
        recovered, probes = _recovered_after(servers, tokens[0], probe_sample, began, began + 120)
        logger.info("%s: answering again %.1f s after the fault", fault, recovered)
        locust.wait(timeout=seconds * 2 + 60)
        ids_received = [line for line in (out / "ids.txt").read_text().split() if line]
        verdicts = [line.split() for line in (out / "verdicts.txt").read_text().splitlines() if line.strip()]
        stored, annotations = _stored(servers.database_url, set(ids_received), timeout_s=120)
        for probe in probes:
            stored.pop(probe, None)
        sent, requests, failed, failed_predictions = _requests(out)
        received = set(ids_received)
        time.sleep(2)  # the last shadow calls are logged and ingested
        shadowed, orphans = _shadowed(servers.database_url)
        judged = {(prediction, user_ids[int(seat)], verdict) for prediction, seat, verdict in verdicts}
        return Figures(
            fault=fault,
            sent=sent,
            answered=len(ids_received),
            stored=len(received & stored.keys()),
            lost=len(received - stored.keys()),
            doubled=(len(ids_received) - len(received)) + sum(1 for n in stored.values() if n > 1),
            stored_unanswered=len(stored.keys() - received),
            shadowed=shadowed,
            shadow_orphans=orphans,
            verdicts=len(judged),
            verdicts_lost=len(judged - annotations),
            failed_requests=failed,
            failed_predictions=failed_predictions,
            requests=requests,
            recovered_s=recovered,
        )
    raise AssertionError("unreachable")  # the with block returns or raises


def run_all(
    faults: list[str],
    *,
    seconds: float,
    users: int,
    env: dict[str, str] | None = None,
    say: Callable[[str], None] = print,
) -> Iterator[Figures]:
    for fault in faults:
        figures = run(fault, seconds=seconds, users=users, env=env)
        say(figures.line())
        yield figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", action="append", choices=FAULTS, help="Repeat for several (default: all).")
    parser.add_argument("--seconds", type=float, default=30, help="Seconds of load per fault.")
    parser.add_argument("--users", type=int, default=12, help="locust users (3 predicting for 1 reviewing).")
    parser.add_argument("--out", type=Path, default=Path("var/faults.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = list(
        run_all(
            args.fault or list(FAULTS), seconds=args.seconds, users=args.users, say=lambda line: logger.info("%s", line)
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(f) for f in results], indent=2))
    logger.info("figures in %s", args.out)
    sys.exit(0 if all(f.kept for f in results) else 1)


if __name__ == "__main__":
    main()
