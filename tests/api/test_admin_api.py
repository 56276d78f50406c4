"""The admins' data-loop API in-process (FastAPI app with the review and admin routers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
from fastapi import APIRouter
from psycopg_pool import ConnectionPool
from starlette.testclient import TestClient

from feedback import review as rs
from feedback.champion import Decision, record_promotion
from feedback.datasets import LabelSchema, Originals, bundled_originals
from feedback.errors import NotFound
from models import digits
from models.npy import npy_bytes
from models.pipeline import BuildResult
from models.signature import to_batch
from service.routes import application
from service.routes.admin import DataLoopContext
from service.routes.admin import router as admin_router
from service.routes.dependencies import ModerationContext
from service.routes.review import router as review_router

pytestmark = pytest.mark.api


def schema_of(name: str) -> LabelSchema:
    if not name.startswith("digits"):
        raise NotFound(f"no model {name!r} is served here")
    return LabelSchema(class_names=digits.CLASS_NAMES, input_shape=digits.INPUT_SHAPE)


@contextmanager
def reviewing_client(moderation: ModerationContext, datasets_root: Path, *routers: APIRouter) -> Iterator[TestClient]:
    """The review router and `routers` in-process, with `moderation` and a data loop of the digits models."""
    app = application(review_router, *routers)
    app.state.moderation = moderation
    app.state.data_loop = DataLoopContext(
        model_name="digits-cnn", schema=schema_of, originals=lambda _conn, _name: None, datasets_root=str(datasets_root)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def originals_of(name: str, split_path: Path) -> Originals:
    found = bundled_originals(name, split_path)
    assert found is not None
    return found


@pytest.fixture
def setup(
    database_url: str, split_path: Path, tmp_path: Path, trained_model: BuildResult
) -> Iterator[tuple[TestClient, ConnectionPool, list[tuple[str, str]]]]:
    announced: list[tuple[str, str]] = []
    with ConnectionPool(database_url, min_size=1, max_size=4, kwargs={"autocommit": True}) as pool:
        app = application(review_router, admin_router)
        app.state.moderation = ModerationContext(
            pool=pool,
            labels=lambda: digits.CLASS_NAMES,
            to_input=lambda _model, sample: (
                npy_bytes(to_batch([sample], digits.digits_signature(), max_samples=1)[0]),
                None,
            ),
            model_name=trained_model.stored.name,
        )
        app.state.data_loop = DataLoopContext(
            model_name=trained_model.stored.name,
            schema=schema_of,
            originals=lambda _conn, name: originals_of(name, split_path),
            datasets_root=str(tmp_path / "datasets"),
            announcer=lambda name, version: announced.append((name, version)),
            shadow_announcer=lambda name, shadow: announced.append(
                (f"shadow of {name}", "" if shadow is None else f"{shadow.model_version} at {shadow.share:g}")
            ),
        )
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, pool, announced


def token(pool: ConnectionPool, name: str, role: rs.Role) -> dict[str, str]:
    with pool.connection() as conn:
        _, secret = rs.create_user(conn=conn, name=name, role=role)
    return {"Authorization": f"Bearer {secret}"}


def test_compile_list_and_read_versions(setup: tuple[TestClient, ConnectionPool, list[tuple[str, str]]]) -> None:
    client, pool, _ = setup
    admin = token(pool, "admin", rs.Role.ADMIN)
    reviewer = token(pool, "rev", rs.Role.REVIEWER)
    assert client.post("/admin/datasets", json={}).status_code == 401
    assert client.post("/admin/datasets", json={}, headers=reviewer).status_code == 403

    sample = {"input": digits.load().images[3].tolist(), "label": "3"}
    assert client.post("/review/samples", json=sample, headers=reviewer).status_code == 201
    first = client.post("/admin/datasets", json={}, headers=admin)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["kind"] == "training" and body["watermark"] == 1 and body["created_by"] == "admin"
    assert body["manifest"]["per_source"] == {"original": body["rows"] - 1, "reviewer": 1}
    again = client.post("/admin/datasets", json={"watermark": 1}, headers=admin).json()
    assert again["id"] == body["id"]

    listed = client.get("/admin/datasets", headers=admin).json()
    assert [v["kind"] for v in listed] == ["validation", "training"]
    assert client.get("/admin/datasets", params={"kind": "training"}, headers=admin).json()[0]["id"] == body["id"]
    assert client.get(f"/admin/datasets/{body['id']}", headers=admin).json()["manifest"]["watermark"] == 1
    assert client.get("/admin/datasets/0123", headers=admin).status_code == 404
    unknown = client.get("/admin/datasets", params={"model": "nope"}, headers=admin)
    assert unknown.status_code == 404 and "no model 'nope' is served here" in unknown.json()["detail"]
    assert client.post("/admin/datasets", params={"model": "nope"}, json={}, headers=admin).status_code == 404

    for bad, status in [({"watermark": 99}, 409), ({"watermark": -1}, 422), ({"include_original": "x"}, 422)]:
        response = client.post("/admin/datasets", json=bad, headers=admin)
        assert response.status_code == status, (bad, response.text)
    assert len(client.get("/admin/datasets", headers=admin).json()) == 2


def test_validation_fixes_and_forced_promotion(
    setup: tuple[TestClient, ConnectionPool, list[tuple[str, str]]], trained_model: BuildResult
) -> None:
    client, pool, announced = setup
    admin = token(pool, "admin", rs.Role.ADMIN)
    assert client.post("/admin/validation/fixes", json={"fixes": [{"item_id": "x", "label": "1"}], "reason": "r"},
                       headers=admin).status_code == 409  # fmt: skip  # nothing frozen yet
    validation = client.post("/admin/datasets", json={}, headers=admin).json()["validation_id"]

    version = trained_model.stored.version
    forced = client.post(f"/admin/models/{version}/promote", json={"reason": "first champion"}, headers=admin)
    assert forced.status_code == 200, forced.text
    assert (forced.json()["decision"], forced.json()["actor"]) == ("forced", "admin")
    assert announced == [(trained_model.stored.name, version)]
    assert client.post("/admin/models/nope/promote", json={"reason": "x"}, headers=admin).status_code == 404
    assert client.post(f"/admin/models/{version}/promote", json={"reason": ""}, headers=admin).status_code == 422

    fix = {"fixes": [{"item_id": "digits:99999", "label": "1"}], "reason": "typo"}
    unknown = client.post("/admin/validation/fixes", json=fix, headers=admin)
    assert unknown.status_code == 404 and "is not in validation version" in unknown.json()["detail"]
    item = digits_item(client, admin, validation)
    fixed = client.post(
        "/admin/validation/fixes", json={"fixes": [{"item_id": item, "label": "0"}], "reason": "smudge"}, headers=admin
    )
    assert fixed.status_code == 201, fixed.text
    assert fixed.json()["version"]["parent_id"] == validation
    # The champion was evaluated on the old version by nobody yet: nothing to re-evaluate.
    assert fixed.json()["reevaluated"] == []
    history = client.get("/admin/promotions", headers=admin).json()
    assert [p["decision"] for p in history] == ["forced"]
    # A gate decision, recorded as a retrain records it, is shown with the margin it was held to.
    with pool.connection() as conn:
        record_promotion(
            conn=conn, model_name=trained_model.stored.name, model_version=version, decision=Decision.REJECTED,
            reason="does not beat", accuracy=0.9, champion_version=version, champion_accuracy=0.95, margin=0.02,
        )  # fmt: skip
    history = client.get("/admin/promotions", headers=admin).json()
    assert [(p["decision"], p["margin"]) for p in history] == [("forced", None), ("rejected", 0.02)]


def digits_item(client: TestClient, headers: dict[str, str], validation_id: str) -> str:
    """A validation item whose label is not '0'."""
    manifest = client.get(f"/admin/datasets/{validation_id}", headers=headers).json()
    table = pq.read_table(Path(manifest["uri"]) / manifest["manifest"]["files"][0], columns=["item_id", "label"])
    labels = zip(table["item_id"].to_pylist(), table["label"].to_pylist(), strict=True)
    return str(next(item for item, label in labels if label != "0"))


@pytest.mark.parametrize("version", ["a:b", "%00", "%ff", "a" * 300, "bad%20tag"])
def test_promoting_a_version_that_is_no_tag_gets_422(
    setup: tuple[TestClient, ConnectionPool, list[tuple[str, str]]], version: str
) -> None:
    client, pool, announced = setup
    admin = token(pool, "admin", rs.Role.ADMIN)
    response = client.post(f"/admin/models/{version}/promote", json={"reason": "try"}, headers=admin)
    assert response.status_code == 422, response.text
    assert "not a model version" in response.json()["detail"]
    assert client.get("/admin/promotions", headers=admin).json() == [] and announced == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/datasets", b'{"watermark": NaN}'),
        ("/admin/datasets", b'{"include_original": Infinity}'),
        ("/admin/validation/fixes", b'{"fixes": [{"item_id": "1", "label": "2"}], "reason": NaN}'),
        ("/admin/models/v1/promote", b'{"reason": -Infinity}'),
    ],
)
def test_non_finite_numbers_in_an_admin_body_get_422(
    setup: tuple[TestClient, ConnectionPool, list[tuple[str, str]]], path: str, body: bytes
) -> None:
    client, pool, _ = setup
    admin = token(pool, "admin", rs.Role.ADMIN)
    response = client.post(path, content=body, headers={**admin, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "NaN" not in response.text and "Infinity" not in response.text


def test_a_shadow_is_started_once_listed_stopped_and_ended_by_a_new_champion(
    setup: tuple[TestClient, ConnectionPool, list[tuple[str, str]]], trained_model: BuildResult, database_url: str
) -> None:
    client, pool, announced = setup
    admin = token(pool, "admin", rs.Role.ADMIN)
    reviewer = token(pool, "rev", rs.Role.REVIEWER)
    name, version = trained_model.stored.name, trained_model.stored.version
    assert client.post("/admin/shadow", json={"version": version}, headers=reviewer).status_code == 403
    for bad, status in [({"version": version, "share": 0}, 422), ({"version": version, "share": 1.5}, 422),
                        ({"version": "v-none"}, 404), ({"version": version, "share": "half"}, 422)]:  # fmt: skip
        response = client.post("/admin/shadow", json=bad, headers=admin)
        assert response.status_code == status, (bad, response.text)
    empty: dict[str, Any] = {"live": None, "evidence": None, "history": [], "over_time": []}
    assert client.get("/admin/shadow", headers=admin).json() == empty
    assert announced == []  # nothing refused was recorded or announced

    started = client.post("/admin/shadow", json={"version": version, "share": 0.25}, headers=admin)
    assert started.status_code == 201, started.text
    assert (started.json()["model_version"], started.json()["share"], started.json()["live"]) == (version, 0.25, True)
    assert started.json()["started_by"] == "admin"
    again = client.post("/admin/shadow", json={"version": version}, headers=admin)
    assert again.status_code == 409 and "stop it first" in again.json()["detail"]
    assert client.get("/admin/shadow", headers=admin).json()["live"]["id"] == started.json()["id"]

    assert client.post("/admin/shadow/stop", json={"reason": " "}, headers=admin).status_code == 422
    stopped = client.post("/admin/shadow/stop", json={"reason": "enough evidence"}, headers=admin)
    assert stopped.status_code == 200, stopped.text
    assert (stopped.json()["live"], stopped.json()["stop_reason"], stopped.json()["stopped_by"]) == (
        False, "enough evidence", "admin")  # fmt: skip
    assert client.post("/admin/shadow/stop", json={"reason": "again"}, headers=admin).status_code == 404
    assert announced == [(f"shadow of {name}", f"{version} at 0.25"), (f"shadow of {name}", "")]

    # A new champion ends the shadow it was judged beside.
    assert client.post("/admin/shadow", json={"version": version}, headers=admin).status_code == 201
    forced = client.post(f"/admin/models/{version}/promote", json={"reason": "live evidence"}, headers=admin)
    assert forced.status_code == 200, forced.text
    listed = client.get("/admin/shadow", headers=admin).json()
    assert listed["live"] is None and len(listed["history"]) == 2
    assert listed["history"][1]["stop_reason"] == f"{name}:{version} became champion (forced)"
    with psycopg.connect(database_url) as conn:
        actions = [r[0] for r in conn.execute("SELECT action FROM audit_log WHERE action LIKE 'shadow.%' ORDER BY id")]
    assert actions == ["shadow.start", "shadow.stop", "shadow.start"]

    # A decision on the live evidence: none judged yet, so rejected; recorded with its figures.
    assert client.post("/admin/shadow/decide", headers=admin).status_code == 404  # no shadow running
    assert client.post("/admin/shadow", json={"version": version}, headers=admin).status_code == 201
    assert client.post("/admin/shadow/decide", headers=admin).status_code == 409  # no validation version yet
    assert client.post("/admin/datasets", json={}, headers=admin).status_code == 201
    decided = client.post("/admin/shadow/decide", headers=reviewer)
    assert decided.status_code == 403
    decided = client.post("/admin/shadow/decide", headers=admin)
    assert decided.status_code == 200, decided.text
    promotion = decided.json()["promotion"]
    assert promotion["decision"] == "rejected" and "0 judged live items, fewer than the 50" in promotion["reason"]
    assert promotion["live_evidence"]["judged"] == 0 and decided.json()["evidence"]["shadowed"] == 0
    assert client.get("/admin/shadow", headers=admin).json()["live"] is None
    assert client.get("/admin/promotions", headers=admin).json()[-1]["live_evidence"] == promotion["live_evidence"]
