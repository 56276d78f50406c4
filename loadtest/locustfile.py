"""Locust users of the service: predicting clients, reviewers and a rare admin.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 \
        --reviewer-token=TOKEN --admin-token=TOKEN --predict-weight 10 --review-weight 2 --admin-weight 1

With `--replicas URL,URL`, the users are spread over those replicas of one service (each user
keeps to one, as behind a load balancer with sticky sessions), `--host` being the first.
Without tokens only predicting users run. `--reviewer-token` may list several tokens, comma
separated: the reviewing users take them in turn. `--ids-file` collects every prediction id
received (one per line), `--verdicts-file` every verdict answered 200 (`<prediction id> <token
index> <verdict>`), so a run can be checked against what was stored (`python -m loadtest.run_locust`,
`python -m loadtest.faults`); `--sent-file` the number of samples of every request sent.

The samples are random numbers of the shape and range of the service's default model, and the
reviewers' labels its class names, all as `GET /models` says when the run starts.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

from locust import HttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

from loadtest.samples import samples, served_model

_SAMPLES: list[Any] = []  # filled when the run starts
_LABELS: list[str] = []
_ids_lock = threading.Lock()
_reviewer_seats = itertools.count()  # which reviewer token the next reviewing user takes
_replica_seats = itertools.count()  # which replica the next user talks to


def _append(path: str, lines: list[str]) -> None:
    if path and lines:
        with _ids_lock, open(path, "a") as out:
            out.write("\n".join(lines) + "\n")


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--reviewer-token", default="", help="Bearer token of a reviewer (several: comma separated)")
    parser.add_argument("--admin-token", default="", help="Bearer token of an admin")
    parser.add_argument("--replicas", default="", help="Base URLs of the service's replicas (comma separated)")
    parser.add_argument("--predict-weight", type=int, default=10)
    parser.add_argument("--review-weight", type=int, default=2)
    parser.add_argument("--admin-weight", type=int, default=1)
    parser.add_argument("--ids-file", default="", help="Append every prediction id received here")
    parser.add_argument("--verdicts-file", default="", help="Append every verdict answered 200 here")
    parser.add_argument("--sent-file", default="", help="Append the number of samples of every request sent here")


@events.test_start.add_listener
def _served(environment: Environment, **_: Any) -> None:
    """Samples and class names for the service's default model, before any user starts."""
    if environment.host is None:
        raise ValueError("no --host: the users need a service to ask for its model")
    model = served_model(environment.host)
    _SAMPLES[:] = samples(model, 500)
    _LABELS[:] = model.class_names


@events.init.add_listener
def _weights(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    PredictingUser.weight = options.predict_weight
    ReviewingUser.weight = options.review_weight if options.reviewer_token else 0
    AdminUser.weight = options.admin_weight if options.admin_token else 0


def _to_a_replica(user: HttpUser) -> None:
    """Point the user at the next replica in turn, when the run names replicas."""
    options = user.environment.parsed_options
    replicas = [r for r in (getattr(options, "replicas", "") if options else "").split(",") if r]
    if replicas:
        user.client.base_url = replicas[next(_replica_seats) % len(replicas)].rstrip("/")


class PredictingUser(HttpUser):
    """A client of `POST /predict`: mostly single digits, sometimes a batch of them."""

    wait_time = between(0.0, 0.05)
    weight = 10

    def on_start(self) -> None:
        _to_a_replica(self)

    def _predict(self, count: int, name: str) -> None:
        body = {"samples": random.sample(_SAMPLES, count), "tags": {"source": "locust"}}
        _append(self.environment.parsed_options.sent_file if self.environment.parsed_options else "", [str(count)])
        with self.client.post("/predict", json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            ids = [p["id"] for p in response.json()["predictions"]]
            if len(ids) != count:
                response.failure(f"{len(ids)} answers for {count} samples")
                return
            _append(self.environment.parsed_options.ids_file if self.environment.parsed_options else "", ids)

    @task(8)
    def one(self) -> None:
        self._predict(1, "/predict [1]")

    @task(2)
    def several(self) -> None:
        self._predict(8, "/predict [8]")


class _Authenticated(HttpUser):
    abstract = True
    token_option = ""

    seat = 0

    def on_start(self) -> None:
        _to_a_replica(self)
        options = self.environment.parsed_options
        tokens = (getattr(options, self.token_option, "") if options else "").split(",")
        self.seat = next(_reviewer_seats) % len(tokens)
        self.client.headers["Authorization"] = f"Bearer {tokens[self.seat]}"


class ReviewingUser(_Authenticated):
    """A reviewer: claims a page, gives verdicts, looks at lists and counts."""

    wait_time = between(0.05, 0.2)
    weight = 2
    token_option = "reviewer_token"

    @task(4)
    def review_a_page(self) -> None:
        answer = self.client.post("/review/claim", json={"count": 5, "strategy": "least_confident"})
        if answer.status_code != 200:
            return  # counted as a failure by locust; nothing to judge
        verdicts = []
        for item in answer.json():
            if random.random() < 0.8:
                verdicts.append({"prediction_id": item["id"], "verdict": "correct"})
            else:
                wrong = random.choice([label for label in _LABELS if label != item["label"]])
                verdicts.append({"prediction_id": item["id"], "verdict": "wrong", "label": wrong})
        if not verdicts:
            return
        answer = self.client.post("/review/verdicts", json={"verdicts": verdicts})
        if answer.status_code == 200:
            options = self.environment.parsed_options
            _append(
                options.verdicts_file if options else "",
                [f"{v['prediction_id']} {self.seat} {v['verdict']}" for v in verdicts],
            )

    @task(2)
    def list_items(self) -> None:
        self.client.get("/review/items", params={"status": "unreviewed", "max_confidence": 0.99, "limit": 20})

    @task(1)
    def counts(self) -> None:
        self.client.get("/review/counts")


class AdminUser(_Authenticated):
    """An admin, now and then: agreement figures and the audit log."""

    wait_time = between(0.5, 1.0)
    weight = 1
    token_option = "admin_token"

    @task
    def look_around(self) -> None:
        self.client.get("/review/agreement")
        self.client.get("/review/audit", params={"limit": 20})
