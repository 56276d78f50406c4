"""What a request may make the service read, over real sockets against `loop serve`."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import requests

from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration

DIGIT = [[1] * 8 for _ in range(8)]


def exchange(url: str, head: bytes, body_size: int = 0, chunk: int = 2**16, timeout: float = 10) -> bytes:
    """Send a raw request (its body `body_size` bytes of spaces, as fast as the server takes them)
    and return what the server answered before closing; a reset is an error."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(head)
        sent = 0
        try:
            while sent < body_size:
                sent += s.send(b" " * min(chunk, body_size - sent))
        except (BrokenPipeError, ConnectionResetError):
            return b"reset while sending"
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            data = s.recv(65536)
            if not data:
                break
            answer += data
    return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def worker_rss(service: RunningService) -> int:
    """Resident memory of the biggest process under `loop serve` (the BentoML worker)."""
    family = psutil.Process(service.process.pid).children(recursive=True)
    return max(p.memory_info().rss for p in family)


@pytest.mark.parametrize("size", [40_000, 1_000_000])
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_an_oversized_request_head_gets_431_not_a_reset(
    shared_service: Callable[..., RunningService], size: int, parser: str
) -> None:
    service = shared_service(LOOP_HTTP_PARSER=parser)
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * size + b"\r\n\r\n"
    answer = exchange(service.url, head)
    assert status_of(answer) == 431, answer[:300]
    assert b"over the limit of 32768 bytes" in answer
    assert httpx.get(f"{service.url}/livez").status_code == 200


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_head_that_never_ends_gets_431_and_a_big_body_after_a_small_head_is_fine(
    shared_service: Callable[..., RunningService], parser: str
) -> None:
    service = shared_service(LOOP_HTTP_PARSER=parser)
    parts = urlsplit(service.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        for i in range(200):  # 1 KiB headers, one at a time: 200 KiB if nothing stopped it
            try:
                s.sendall(b"X-Part-%d: " % i + b"y" * 1000 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.002)
        s.settimeout(5)
        while b"\r\n\r\n" not in answer and (data := s.recv(65536)):
            answer += data
    assert status_of(answer) == 431, answer[:300]
    # A head well under the limit followed at once by a body far over it is a normal request.
    samples = [DIGIT] * 200
    answered = httpx.post(f"{service.url}/predict", json={"samples": samples}, timeout=30)
    assert answered.status_code == 200 and len(answered.json()["predictions"]) == 200


def test_a_50_mb_body_gets_413_unread_and_others_are_not_held_up(shared_service: Callable[..., RunningService]) -> None:
    service = shared_service(LOOP_HTTP_PARSER="httptools")
    size = 50_000_000
    before = worker_rss(service)
    for path in ("/predict", "/review/verdicts", "/predict/npy"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
        ).encode()
        answer = exchange(service.url, head, body_size=size)
        assert status_of(answer) == 413, answer[:300]
        assert f"the body of {size} bytes is over the limit".encode() in answer
    # Nothing of it was buffered: the worker is about as big as before.
    assert worker_rss(service) - before < 100 * 2**20
    small = httpx.post(f"{service.url}/predict", json={"samples": [DIGIT]}, timeout=10)
    assert small.status_code == 200, small.text


def _with_urllib(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # sends Connection: close
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def _with_requests(url: str, body: bytes) -> tuple[int, bytes]:
    answer = requests.post(url, data=body, headers={"Connection": "close", "Content-Type": "application/json"},
                           timeout=30)  # fmt: skip
    return answer.status_code, answer.content


def _with_httpx(url: str, body: bytes) -> tuple[int, bytes]:
    answer = httpx.post(url, content=body, headers={"Connection": "close", "Content-Type": "application/json"},
                        timeout=30)  # fmt: skip
    return answer.status_code, answer.content


def _with_a_socket(url: str, body: bytes) -> tuple[int, bytes]:
    parts = urlsplit(url)
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(head + body)  # all of it, as a simple client does, before reading a byte
        answer = b""
        while data := s.recv(65536):
            answer += data
    return status_of(answer), answer.split(b"\r\n\r\n", 1)[1]


CLIENTS = {"urllib": _with_urllib, "requests": _with_requests, "httpx": _with_httpx, "socket": _with_a_socket}


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_body_over_the_limit_with_connection_close_gets_413_in_every_common_client(
    shared_service: Callable[..., RunningService], parser: str, client: str
) -> None:
    """The server answers before it reads the body, then lingers: it stops writing, drops what
    is still coming and closes only then, so no client reads a reset instead of the answer."""
    service = shared_service(LOOP_HTTP_PARSER=parser)
    body = b"[" + b" " * 20_000_000 + b"]"  # 20 MB: far more than the sockets' buffers hold
    status, content = CLIENTS[client](f"{service.url}/predict", body)
    assert status == 413, content[:300]
    assert f"the body of {len(body)} bytes is over the limit".encode() in content
    assert httpx.get(f"{service.url}/livez").status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(shared_service: Callable[..., RunningService]) -> None:
    service = shared_service(LOOP_HTTP_PARSER="httptools")

    def pieces() -> Iterator[bytes]:
        yield b'{"samples": ['
        for _ in range(100_000):  # about 20 MB, sent without a Content-Length
            yield json.dumps(DIGIT).encode() + b","
        yield b"[]]}"

    response = httpx.post(
        f"{service.url}/predict", content=pieces(), headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 413, response.text
    assert "over the limit of 4194304 bytes" in response.json()["detail"]


def test_requests_beyond_a_workers_concurrency_get_429_as_problem_details(
    start_service: Callable[..., RunningService],
) -> None:
    service = start_service(LOOP_MAX_CONCURRENCY="2")
    parts = urlsplit(service.url)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{"
    ).encode()
    held = [socket.create_connection((parts.hostname, parts.port), timeout=10) for _ in range(2)]
    try:
        for s in held:  # two requests whose bodies never finish: each holds one of the two places
            s.sendall(head)
        refused = httpx.post(f"{service.url}/predict", json={"samples": [DIGIT]}, timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        # Refused before its body is read, a large one sent with `Connection: close` still reads the 429.
        status, content = _with_urllib(f"{service.url}/predict", b"[" + b" " * 3_000_000 + b"]")
        assert status == 429 and json.loads(content)["status"] == 429, content[:300]
        assert httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200  # probes are never refused
    finally:
        for s in held:
            s.close()
    answered = httpx.post(f"{service.url}/predict", json={"samples": [DIGIT]}, timeout=10)
    assert answered.status_code == 200, answered.text  # the places are free again
