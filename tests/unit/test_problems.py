"""Every error answer is RFC 9457 problem details, whoever made it."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from feedback import errors
from feedback.errors import Conflict
from service.problems import PROBLEM_JSON, ProblemDetails, answer, encoded, invalid_request

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


@pytest.mark.parametrize(
    ("error", "status", "header"),
    [
        (errors.Malformed("samples[0] is not base64 text"), 400, None),
        (errors.Unauthenticated("unknown token"), 401, ("www-authenticate", "Bearer")),
        (errors.Forbidden("this needs the admin role"), 403, None),
        (errors.NotFound("no prediction 1"), 404, None),
        (errors.Conflict("you hold no live lease"), 409, None),
        (errors.TooLarge("over the limit"), 413, None),
        (errors.Unsupported("not uploaded files"), 415, None),
        (errors.Invalid("unknown label '11'"), 422, None),
        (errors.Busy("64 requests in hand"), 429, ("retry-after", "1")),
        (errors.Overloaded("over the latency budget"), 503, None),
        (errors.Unavailable("not ready"), 503, None),
        (KeyError("a bug"), 500, None),
    ],
)
def test_each_domain_error_is_answered_with_its_status_the_same_way_everywhere(
    error: Exception, status: int, header: tuple[str, str] | None
) -> None:
    response = answer(error)
    body = json.loads(bytes(response.body))
    assert response.status_code == body["status"] == status
    assert body["detail"] == (str(error) if status != 500 else "the service failed to answer; its log says why")
    assert header is None or response.headers[header[0]] == header[1]
    # The fast path's bytes say the same, with the same headers.
    fast_status, fast_headers, fast_body = encoded(error)
    assert (fast_status, json.loads(fast_body)) == (status, body)
    assert dict(fast_headers)[b"content-type"] == PROBLEM_JSON.encode()
    assert header is None or dict(fast_headers)[header[0].encode()] == header[1].encode()
    # The Open Inference Protocol's clients read `error` as well.
    assert json.loads(bytes(answer(error, v2=True).body))["error"] == body["detail"]


def test_invalid_fields_are_listed() -> None:
    body = json.loads(bytes(answer(errors.Invalid("bad", fields=[{"field": "query.x", "message": "unknown"}])).body))
    assert body["errors"] == [{"field": "query.x", "message": "unknown"}]
