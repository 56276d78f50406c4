"""The service's HTTP faces, a module each: `predict` (`.npy` bodies and uploads; `POST /predict`
with JSON is BentoML's API in `service.app` and the fast path), `open_inference` (the Open
Inference Protocol under `/v2`, its messages in `v2`), `models` (what is served, and the stored
predictions), `review` (under `/review`, with the review `page`), `admin` (under `/admin`), `repository`
(the protocol's model repository, under `/v2/repository`) and `label_studio` (Label Studio's ML
backend interface, under `/label-studio/{model}`).
`fields` holds their field types, `dependencies` the caller and the request's database
connection, `faces` what the prediction faces share. Each route translates HTTP to a call of the
data plane (`service.predictions`) or of `feedback/` and back; what it raises is answered by
`service.problems`."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from service import problems
from service.contract import ContractRoute


def application(*routers: APIRouter) -> FastAPI:
    """An app of `routers` whose every error is problem details (`service.problems`), without the
    docs pages (BentoML serves the schema)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = ContractRoute  # every route: no unknown query parameter
    problems.install(app)
    for router in routers:
        app.include_router(router)
    return app
