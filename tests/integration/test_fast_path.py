"""`POST /predict` answered in front of BentoML's stack (service.fast_path) answers exactly what
BentoML's API path answers, and is the path the requests take."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from models import digits
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

DIGIT = digits.load().images[0].tolist()
JSON = {"content-type": "application/json"}

# (name, body bytes, extra headers, query string): what clients send, good and bad.
REQUESTS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("one digit", json.dumps({"samples": [DIGIT]}).encode(), {}, ""),
    ("two digits, tags", json.dumps({"samples": [DIGIT, DIGIT], "tags": {"app": "t"}}).encode(), {}, ""),
    ("a request id", json.dumps({"samples": [DIGIT]}).encode(), {"x-request-id": "req-1"}, ""),
    ("charset", json.dumps({"samples": [DIGIT]}).encode(), {"content-type": "application/json; charset=utf-8"}, ""),
    ("wrong shape", b'{"samples": [[1, 2]]}', {}, ""),
    ("no samples", b'{"samples": []}', {}, ""),
    ("unknown member", json.dumps({"samples": [DIGIT], "x": 1}).encode(), {}, ""),
    ("null model", json.dumps({"samples": [DIGIT], "model": None}).encode(), {}, ""),
    ("unknown model", json.dumps({"samples": [DIGIT], "model": "nope"}).encode(), {}, ""),
    ("not JSON", b"{samples", {}, ""),
    ("empty body", b"", {}, ""),
    ("NaN", b'{"samples": [[[NaN]]]}', {}, ""),
    ("a query string", json.dumps({"samples": [DIGIT]}).encode(), {}, "x=1"),
    ("text/plain", json.dumps({"samples": [DIGIT]}).encode(), {"content-type": "text/plain"}, ""),
]


def _comparable(response: httpx.Response) -> tuple[int, str, Any]:
    """Status, media type and body, with what differs by request (ids, the worker) left out."""
    text = re.sub(r'"(id|request_id)":\s*"[^"]+"', r'"\1": "-"', response.text)
    try:
        body: Any = json.loads(text)
    except json.JSONDecodeError:
        body = text
    return response.status_code, response.headers.get("content-type", ""), body


def _send(service: RunningService, body: bytes, headers: dict[str, str], query: str) -> httpx.Response:
    url = f"{service.url}/predict" + (f"?{query}" if query else "")
    return httpx.post(url, content=body, headers={**JSON, **headers}, timeout=30)


def test_the_fast_path_answers_what_bentomls_path_answers(start_service: Callable[..., RunningService]) -> None:
    fast = start_service()
    answers = [_send(fast, body, headers, query) for _, body, headers, query in REQUESTS]
    # Read before the second service starts: services of one BentoML home share its metrics folder.
    metrics = _metrics(fast)
    through_bentoml = start_service(LOOP_FAST_PATH="false")
    for (name, body, headers, query), a in zip(REQUESTS, answers, strict=True):
        b = _send(through_bentoml, body, headers, query)
        assert _comparable(a) == _comparable(b), name
        if a.status_code == 200:
            assert {"x-request-id", "x-loop-worker", "server"} <= set(a.headers), name
            assert a.headers["server"] == b.headers["server"]
            assert a.headers["x-request-id"] == headers.get("x-request-id", a.headers["x-request-id"])

    # The good JSON requests took the fast path; BentoML's own request counter saw only the others
    # (a query string, another media type), and sees every one when the fast path is off.
    pattern = r'^loop_fast_path_request_seconds_count\{route="/predict",status="(\d+)"\} (\S+)$'
    fast_answers = {status: float(n) for status, n in re.findall(pattern, metrics, re.M)}
    assert fast_answers == {"200": 4, "400": 2, "404": 1}, fast_answers  # wrong shape and NaN; unknown model
    answered = sum(a.status_code == 200 for a in answers)
    assert _bentoml_predictions(metrics) == answered - 4
    assert _bentoml_predictions(_metrics(through_bentoml)) == answered


def _metrics(service: RunningService) -> str:
    return httpx.get(f"{service.url}/metrics", timeout=10).text


def _bentoml_predictions(metrics: str) -> float:
    """BentoML's count of `POST /predict` answered 200."""
    pattern = r'^bentoml_service_request_total\{endpoint="/predict",http_response_code="200",[^}]*\} (\S+)$'
    return sum(float(n) for n in re.findall(pattern, metrics, re.M))
