"""The contract's pieces: types whose schema is their check, unknown query parameters refused,
a 405's Allow, and the schema BentoML writes finished with problem details."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import psycopg
import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from feedback.predictions.records import created_at
from service.contract import finish_openapi
from service.problems import PROBLEM_JSON
from service.routes import application
from service.routes.fields import Instant, ItemId, Number


class Body(BaseModel):
    at: Instant | None = None
    item: ItemId | None = None
    share: Number | None = None


@pytest.mark.parametrize(
    "bad",
    [
        {"at": 0.5},  # a number pydantic would read as a Unix time
        {"at": "2026-01-31"},  # a date, not a date-time
        {"item": "e3e70682-c209-1cac-a29f-6fbed82c07cd"},  # a UUIDv1
        {"item": "0190f1d2000070008000000000000000"},  # no hyphens
        {"share": True},
        {"share": "0.5"},
    ],
)
def test_values_the_schema_forbids_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Body.model_validate(bad)


def test_values_the_schema_allows_are_taken_and_the_schema_says_the_check() -> None:
    body = Body.model_validate(
        {"at": "2026-01-31T12:00:00Z", "item": "0190F1D2-0000-7000-8000-000000000000", "share": 1}
    )
    assert body.item == uuid.UUID("0190f1d2-0000-7000-8000-000000000000") and body.share == 1.0
    properties = Body.model_json_schema()["properties"]
    assert properties["item"]["anyOf"][0]["pattern"].startswith("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-7")
    assert properties["at"]["anyOf"][0]["format"] == "date-time"


def test_an_id_from_after_the_year_9999_finds_nothing_instead_of_failing() -> None:
    latest = uuid.UUID("ffffffff-ffff-7fff-bfff-ffffffffffff")
    assert created_at(latest).year == 9999


def app() -> FastAPI:
    api = application()

    @api.get("/things")
    def things(limit: Annotated[int, Query(ge=1)] = 10) -> dict[str, int]:
        return {"limit": limit}

    @api.post("/things")
    def add_thing() -> dict[str, str]:
        return {}

    return api


def test_an_unknown_query_parameter_is_refused_naming_it() -> None:
    client = TestClient(app())
    assert client.get("/things", params={"limit": 3}).json() == {"limit": 3}
    refused = client.get("/things", params={"limit": 3, "limt": 4})
    assert refused.status_code == 422 and refused.headers["content-type"] == PROBLEM_JSON
    assert refused.json()["errors"] == [{"field": "query.limt", "message": "unknown query parameter"}]
    assert "this route takes: limit" in refused.json()["detail"]
    invalid = client.get("/things", params={"limit": 0})
    assert invalid.status_code == 422 and invalid.json()["errors"][0]["field"] == "query.limit"


def test_a_405_allows_every_method_of_the_path() -> None:
    refused = TestClient(app()).delete("/things")
    assert refused.status_code == 405 and refused.headers["content-type"] == PROBLEM_JSON
    assert refused.headers["allow"] == "GET, POST"


def test_bentoml_operations_document_problem_details_and_its_error_models_go() -> None:
    foreign = {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}}
    spec: dict[str, Any] = {
        "paths": {
            "/predict": {
                "post": {
                    "x-bentoml-name": "predict",
                    "responses": {"200": {}, "400": {"content": foreign}, "500": {"content": foreign}},
                }
            },
            "/mine": {
                "get": {
                    "responses": {
                        "200": {},
                        "422": {
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
                            }
                        },
                    }
                }
            },
        },
        "components": {"schemas": {"InvalidArgument": {}, "HTTPValidationError": {}, "Mine": {}}},
    }
    finished = finish_openapi(spec)
    predict = finished["paths"]["/predict"]["post"]["responses"]
    assert "500" not in predict and {"400", "404", "413", "415", "422", "503"} <= predict.keys()
    assert all(list(predict[s]["content"]) == [PROBLEM_JSON] for s in predict if s != "200")
    assert list(finished["paths"]["/mine"]["get"]["responses"]["422"]["content"]) == [PROBLEM_JSON]
    assert finished["components"]["schemas"] == {"Mine": {}}


def test_a_statement_past_the_services_timeout_is_cancelled(database_url: str) -> None:
    from service import database
    from service.settings import Settings

    with database.connect(
        database_url, statement_timeout_s=Settings(statement_timeout_s=0.2).statement_timeout_s
    ) as conn:
        conn.execute("SELECT pg_sleep(0.05)")  # within it
        with pytest.raises(psycopg.OperationalError, match="statement timeout"):  # the routes answer 503 for it
            conn.execute("SELECT pg_sleep(2)")
