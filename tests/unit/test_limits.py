"""Request bodies bounded before they are parsed: the middleware on a tiny app of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.limits import BodyLimits, RequestLimits

pytestmark = pytest.mark.unit

LIMITS = BodyLimits(predict=1000, other=100)


@pytest.fixture
def client() -> Iterator[tuple[TestClient, list[int]]]:
    """An app that records the size of every body it was handed."""
    seen: list[int] = []

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        seen.append(len(body))
        return JSONResponse({"size": len(body), "path": request.url.path})

    paths = ("/predict", "/predict/files", "/review/x")
    app = Starlette(routes=[Route(path, echo, methods=["POST"]) for path in paths])
    app.add_middleware(RequestLimits, limits=lambda: LIMITS)
    with TestClient(app) as c:
        yield c, seen


def chunks(total: int, size: int = 64) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


@pytest.mark.parametrize(("path", "limit"), [("/predict", 1000), ("/review/x", 100)])
def test_bodies_up_to_the_limit_pass_and_larger_ones_get_413_unread(
    client: tuple[TestClient, list[int]], path: str, limit: int
) -> None:
    http, seen = client
    assert http.post(path, content=b"x" * limit).json()["size"] == limit
    over = http.post(path, content=b"x" * (limit + 1))
    assert over.status_code == 413
    assert f"{limit + 1} bytes is over the limit of {limit} bytes for {path}" in over.json()["detail"]
    assert seen == [limit]  # the app never saw the large one


def test_a_chunked_body_is_read_only_up_to_the_limit(client: tuple[TestClient, list[int]]) -> None:
    http, seen = client
    ok = http.post("/predict", content=chunks(1000))
    assert ok.status_code == 200 and ok.json()["size"] == 1000
    assert "content-length" not in ok.request.headers  # it really was chunked
    over = http.post("/predict", content=chunks(5000))
    assert over.status_code == 413 and "over the limit of 1000 bytes" in over.json()["detail"]
    assert seen == [1000]


def test_multipart_on_the_json_route_goes_to_the_upload_route_and_other_forms_get_415(
    client: tuple[TestClient, list[int]],
) -> None:
    http, seen = client
    upload = http.post("/predict", files={"a": ("a.png", b"12345")})
    assert upload.status_code == 200 and upload.json()["path"] == "/predict/files"
    form = http.post("/predict", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "takes a JSON body" in form.json()["detail"]
    assert len(seen) == 1
    # Other routes decide for themselves.
    assert http.post("/review/x", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"}) \
        .json()["path"] == "/review/x"  # fmt: skip
