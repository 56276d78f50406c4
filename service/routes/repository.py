"""The Open Inference Protocol's model repository extension (Triton's): list the store's models with
their state, load one into the running service, unload it. Admins only (`service.repository`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from feedback.errors import Unavailable
from service.problems import documented
from service.repository import Repository
from service.routes.dependencies import Admin, GuardedRoute, RequestBody
from service.routes.fields import Flag, ModelName, ModelVersion

router = APIRouter(
    prefix="/v2/repository",
    tags=["v2"],
    route_class=GuardedRoute,
    responses=documented(400, 401, 403, 404, 409, 422, 503),
)


class IndexIn(RequestBody):
    ready: Flag = Field(default=False, description="Only the versions that are served (READY).")


class LoadParameters(RequestBody):
    version: ModelVersion | None = Field(
        default=None, description="The stored version to serve, by tag or number (else its champion)."
    )


class LoadIn(RequestBody):
    parameters: LoadParameters = Field(default_factory=LoadParameters)


def _repository(request: Request) -> Repository:
    repository: Repository | None = getattr(request.app.state, "repository", None)
    if repository is None:
        raise Unavailable("the model repository is not ready")
    return repository


@router.post("/index")
def repository_index(request: Request, admin: Admin, body: IndexIn | None = None) -> Any:
    """Every stored model version, with its state here (READY: the version a model serves)."""
    entries = _repository(request).index()
    return [e for e in entries if e["state"] == "READY"] if body is not None and body.ready else entries


@router.post("/models/{name}/load")
async def repository_load(request: Request, name: ModelName, admin: Admin, body: LoadIn | None = None) -> Any:
    """Serve a stored model in every worker, without a restart: answers once it serves here."""
    version = None if body is None else body.parameters.version
    served = await _repository(request).load(name, version)
    return {"name": served.stored.name, "version": served.stored.version, "state": "READY"}


@router.post("/models/{name}/unload")
async def repository_unload(request: Request, name: ModelName, admin: Admin) -> Any:
    """Take a model loaded through the repository out of every worker; requests already in it finish."""
    await _repository(request).unload(name)
    return {"name": name, "state": "UNAVAILABLE"}
