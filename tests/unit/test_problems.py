"""Every error answer is RFC 9457 problem details, whoever made it."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from feedback.errors import Conflict
from service.problems import PROBLEM_JSON, ProblemDetails, answer, invalid_request

pytestmark = pytest.mark.unit


def app() -> TestClient:
    async def bento_style(_: Request) -> Response:
        return JSONResponse({"error": "samples must be a list"}, status_code=400)

    async def fastapi_style(_: Request) -> Response:
        return JSONResponse({"detail": [{"loc": ["body", "count"], "msg": "too big", "type": "x"}]}, status_code=422)

    async def ours(_: Request) -> Response:
        return answer(Conflict("you hold no live lease"))

    async def fine(_: Request) -> Response:
        return JSONResponse({"error": "not an error: a 200"})

    async def text(_: Request) -> Response:
        return PlainTextResponse("teapot", status_code=418)

    handlers = {"/predict": bento_style, "/review/claim": fastapi_style, "/ours": ours, "/fine": fine, "/text": text,
                "/v2/models/m/infer": bento_style}  # fmt: skip
    routes = [Route(path, handler) for path, handler in handlers.items()]
    return TestClient(ProblemDetails(Starlette(routes=routes)))


def test_errors_of_any_origin_become_problem_details() -> None:
    client = app()
    bento = client.get("/predict")
    assert bento.headers["content-type"] == PROBLEM_JSON
    assert bento.json() == {"type": "about:blank", "title": "Bad Request", "status": 400,
                            "detail": "samples must be a list"}  # fmt: skip
    invalid = client.get("/review/claim").json()
    assert invalid["status"] == 422 and invalid["errors"] == [{"field": "body.count", "message": "too big"}]
    assert invalid["detail"] == "the request is not valid: body.count: too big"
    assert client.get("/ours").json()["detail"] == "you hold no live lease"
    v2 = client.get("/v2/models/m/infer").json()
    assert v2["detail"] == v2["error"] == "samples must be a list"  # the protocol's clients read `error`
    assert client.get("/fine").json() == {"error": "not an error: a 200"}  # success is left alone
    assert client.get("/text").text == "teapot"  # other plain text: left alone
    unknown = client.get("/nowhere")  # Starlette's router's own plain-text answers
    assert unknown.headers["content-type"] == PROBLEM_JSON
    assert unknown.json() == {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "Not Found"}
    wrong_method = client.delete("/fine")
    assert wrong_method.status_code == 405 and wrong_method.json()["title"] == "Method Not Allowed"


def test_validation_problems_name_fields_without_echoing_input() -> None:
    errors = [{"loc": ("body", "samples", 0), "msg": "not a number", "input": "SECRET"} for _ in range(7)]
    body = bytes(answer(invalid_request(errors)).body).decode()
    assert "SECRET" not in body and "(and 2 more)" in body and '"field":"body.samples.0"' in body
