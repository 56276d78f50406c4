"""Label Studio as a front end to the review queue: the ML backend interface and the webhook against
`loop serve`, `loop review export|import`, and the real Label Studio (installed by `make test` into
an environment of its own) driving them through its SDK."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from feedback import review as rs
from feedback.review import label_studio as ls
from harness import free_port
from harness import label_studio as studio
from models import store
from tests.graphs import SHAPES, import_shapes_model, random_png
from tests.integration.conftest import ROOT, RunningService

pytestmark = pytest.mark.integration

CONFIG = ls.LabelConfig(from_name="shape", to_name="picture", data_key="img", choices=tuple(SHAPES))


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> store.StoredModel:
    return import_shapes_model(tmp_path_factory.mktemp("ls"), "team-shapes-ls")


@pytest.fixture
def image_host() -> Iterator[str]:
    """An HTTP server on a free port that answers a PNG for any path."""
    png = random_png(7)

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def data_uri(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(random_png(seed)).decode()


DATA_URI_1 = data_uri(1)


def choice(label: str, config: ls.LabelConfig = CONFIG) -> list[dict[str, Any]]:
    names = {"from_name": config.from_name, "to_name": config.to_name}
    return [{**names, "type": "choices", "value": {"choices": [label]}}]


def until(condition: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def stored_for_task(database_url: str, task: int) -> tuple[uuid.UUID, str] | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT id, label FROM predictions WHERE tags ->> 'label_studio.task' = %s ORDER BY created_at DESC",
            (str(task),),
        ).fetchone()
    return None if row is None else (row[0], row[1])


def verdicts(database_url: str, item: uuid.UUID) -> list[tuple[str, str, str | None]]:
    """(reviewer, verdict, label) of every annotation of an item, oldest first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT u.name, a.verdict, a.label FROM annotations a JOIN users u ON u.id = a.actor_id"
            " WHERE a.prediction_id = %s ORDER BY a.id",
            (item,),
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def loop_cli(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", *arguments]
    return subprocess.run(
        command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def admin_token(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, token = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
    return token


def connects_only_a_matching_project(url: str, backend: str, version: str) -> None:
    assert httpx.get(f"{backend}/health").json()["status"] == "UP"
    assert httpx.get(f"{url}/label-studio/nobody/health").status_code == 404
    wrong = ls.LabelConfig("shape", "picture", "img", ("circle", "square", "hexagon")).xml()
    refused = httpx.post(f"{backend}/setup", json={"project": "1.1", "schema": wrong})
    assert refused.status_code == 422 and "missing triangle" in refused.json()["detail"], refused.text
    assert "not classes of" in refused.json()["detail"] and "hexagon" in refused.json()["detail"]
    assert httpx.post(f"{backend}/setup", json={"schema": "<View>"}).status_code == 422
    assert httpx.post(f"{backend}/setup", json={"project": "1.1", "schema": CONFIG.xml()}).json() == {
        "model_version": version
    }


def refuses_what_it_cannot_read(backend: str, image_host: str) -> None:
    elsewhere = f"{image_host.replace('127.0.0.1', 'localhost')}/a.png"  # another origin
    for data, fragment in [({"img": elsewhere}, "not on a host"), ({"other": "x"}, "no 'img'"),
                           ({"img": "data:image/png;base64,@@"}, "base64")]:  # fmt: skip
        bad = httpx.post(f"{backend}/predict", json={"tasks": [{"id": 9, "data": data}], "label_config": CONFIG.xml()})
        assert bad.status_code == 422 and fragment in bad.json()["detail"], bad.text


def exports_and_imports(
    service_env: dict[str, str], model: str, tmp_path: Path, item: uuid.UUID, result: dict[str, Any], other: str
) -> None:
    """Exported for Label Studio, and an export's annotations imported: twice records nothing new."""
    env = {**service_env, "LOOP_MODEL_NAME": model}
    exported = tmp_path / "tasks.json"
    done = loop_cli(env, "review", "export", "--format", "label-studio", "-o", str(exported))
    assert done.returncode == 0, done.stderr
    written = {t["data"][ls.ITEM_KEY]: t for t in json.loads(exported.read_text())}
    assert len(written) == 2 and written[str(item)]["data"]["image"] == DATA_URI_1
    assert written[str(item)]["predictions"][0]["score"] == result["score"]
    for n, task in enumerate(written.values()):
        task["annotations"] = [{"id": 6000 + n, "completed_by": 8, "result": choice(other)}]
    exported.write_text(json.dumps(list(written.values())))
    first = loop_cli(env, "review", "import", "--format", "label-studio", str(exported), "--admin", "root")
    assert first.returncode == 0 and "2 recorded" in first.stderr, first.stderr
    again = loop_cli(env, "review", "import", "--format", "label-studio", str(exported), "--admin", "root")
    assert again.returncode == 0 and "2 unchanged" in again.stderr, again.stderr
    assert verdicts(service_env["LOOP_DATABASE_URL"], item)[-1][0] == "label-studio.8"
    exported.write_text("{")
    assert "is not JSON" in loop_cli(env, "review", "import", "--format", "label-studio", str(exported),
                                     "--admin", "root").stderr  # fmt: skip


def test_the_ml_backend_interface_stores_predictions_and_records_annotations(
    start_service: Callable[..., RunningService], image_model: store.StoredModel, image_host: str,
    database_url: str, service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    token = admin_token(database_url)
    service = start_service(LOOP_MODELS=image_model.tag, LOOP_FETCH_HOSTS=image_host)
    backend = f"{service.url}/label-studio/{image_model.name}"
    version = f"{image_model.name}:{image_model.version}"

    connects_only_a_matching_project(service.url, backend, version)

    tasks = [{"id": 101, "data": {"img": DATA_URI_1}}, {"id": 102, "data": {"img": f"{image_host}/a.png"}}]
    answer = httpx.post(f"{backend}/predict", json={"tasks": tasks, "label_config": CONFIG.xml(), "project": "1.1"})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 2 and answer.json()["model_version"] == version
    for result in results:
        assert result["model_version"] == version and 1 / 3 <= result["score"] <= 1
        (region,) = result["result"]
        assert (region["from_name"], region["to_name"], region["type"]) == ("shape", "picture", "choices")
        assert region["value"]["choices"][0] in SHAPES
    refuses_what_it_cannot_read(backend, image_host)

    # The predictions were stored like any other, tagged with their tasks.
    item, predicted = until(lambda: stored_for_task(database_url, 101), "task 101's prediction in Postgres")
    assert predicted == results[0]["result"][0]["value"]["choices"][0]
    other = next(s for s in SHAPES if s != predicted)

    def event(action: str, annotation: dict[str, Any], **headers: str) -> httpx.Response:
        body = {"action": action, "annotation": annotation, "task": {"id": 101, "data": tasks[0]["data"]}}
        return httpx.post(f"{backend}/webhook", json=body, headers=headers, timeout=30)

    bearer = {"Authorization": f"Bearer {token}"}
    annotation = {"id": 5001, "completed_by": 7, "task": 101, "result": choice(other)}
    assert event("ANNOTATION_CREATED", annotation).status_code == 401
    assert event("ANNOTATION_CREATED", annotation, **bearer).json()["outcomes"] == ["recorded"]
    assert event("ANNOTATION_CREATED", annotation, **bearer).json()["outcomes"] == ["unchanged"]  # delivered twice
    agreed = {**annotation, "result": choice(predicted)}
    assert event("ANNOTATION_UPDATED", agreed, **bearer).json()["outcomes"] == ["recorded"]
    assert verdicts(database_url, item) == [("label-studio.7", "wrong", other), ("label-studio.7", "correct", None)]
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 5001}]}
    for outcome in ("withdrawn", "unchanged"):
        assert httpx.post(f"{backend}/webhook", json=deleted, headers=bearer).json()["outcomes"] == [outcome]
    assert verdicts(database_url, item)[-1] == ("label-studio.7", "undo", None)
    ignored = httpx.post(f"{backend}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}, headers=bearer)
    assert ignored.json() == {"action": "PROJECT_UPDATED", "ignored": True}
    strange = {**annotation, "id": 5002, "result": choice("hexagon")}
    assert event("ANNOTATION_CREATED", strange, **bearer).status_code == 422

    exports_and_imports(service_env, image_model.name, tmp_path, item, results[0], other)


def test_label_studio_itself_uses_the_model_and_its_annotations_become_verdicts(
    start_service: Callable[..., RunningService], image_model: store.StoredModel, database_url: str,
    service_env: dict[str, str], tmp_path: Path,
) -> None:  # fmt: skip
    try:
        studio.python()
    except studio.NotInstalled as exc:
        pytest.fail(str(exc))  # `make test` installs it first
    token = admin_token(database_url)
    service = start_service(LOOP_MODELS=image_model.tag)
    version = f"{image_model.name}:{image_model.version}"
    with studio.running(tmp_path / "label-studio") as label_studio:
        project = label_studio.sdk("project", title="shapes", label_config=CONFIG.xml())["project"]
        backend = f"{service.url}/label-studio/{image_model.name}"
        connected = label_studio.sdk("connect", project=project, url=backend, token=token)
        assert connected["error"] is None and connected["webhooks"] == 1, connected
        label_studio.sdk("import_tasks", project=project, tasks=[{"img": data_uri(s)} for s in range(4)])
        tasks = label_studio.sdk("predict", project=project)["tasks"]
        assert len(tasks) == 4
        for task in tasks:  # Label Studio shows our predictions, and we stored them
            (shown,) = task["predictions"]
            assert shown["model_version"] == version and 1 / 3 <= shown["score"] <= 1, shown
            label = shown["result"][0]["value"]["choices"][0]
            assert until(functools.partial(stored_for_task, database_url, task["id"]), "the prediction")[1] == label

        first, second = tasks[0], tasks[1]
        item = until(lambda: stored_for_task(database_url, first["id"]), "the prediction")[0]
        predicted = first["predictions"][0]["result"][0]["value"]["choices"][0]
        other = next(s for s in SHAPES if s != predicted)
        made = label_studio.sdk("annotate", task=first["id"], result=choice(other))
        reviewer = f"label-studio.{made['user']}"
        until(lambda: verdicts(database_url, item) == [(reviewer, "wrong", other)], "the verdict")
        label_studio.sdk("change", annotation=made["annotation"], result=choice(predicted))
        until(lambda: verdicts(database_url, item)[-1] == (reviewer, "correct", None), "the new verdict")
        second_item = stored_for_task(database_url, second["id"])
        assert second_item is not None
        kept = label_studio.sdk("annotate", task=second["id"], result=choice(other))
        until(lambda: len(verdicts(database_url, second_item[0])) == 1, "the second verdict")
        label_studio.sdk("delete", annotation=kept["annotation"])
        until(lambda: verdicts(database_url, second_item[0])[-1] == (reviewer, "undo", None), "the undo")

        # Label Studio's export, imported: the webhook recorded it all already.
        env = {**service_env, "LOOP_MODEL_NAME": image_model.name}
        export = tmp_path / "export.json"
        export.write_text(json.dumps(label_studio.sdk("export", project=project)))
        done = loop_cli(env, "review", "import", "--format", "label-studio", str(export), "--admin", "root")
        assert done.returncode == 0 and "1 unchanged" in done.stderr, done.stderr

        round_trip_through_a_project_of_its_own(label_studio, env, tmp_path, database_url, reviewer)


def round_trip_through_a_project_of_its_own(
    label_studio: studio.LabelStudio, env: dict[str, str], tmp_path: Path, database_url: str, reviewer: str
) -> None:
    """Our export into a project of its own (no backend), annotated there, imported back."""
    ours, xml = tmp_path / "ours.json", tmp_path / "config.xml"
    config = ls.LabelConfig("kind", "shown", "png", tuple(SHAPES))
    xml.write_text(config.xml())
    done = loop_cli(env, "review", "export", "--format", "label-studio", "--label-config", str(xml), "-o", str(ours))
    assert done.returncode == 0, done.stderr
    second_project = label_studio.sdk("project", title="exported", label_config=config.xml())["project"]
    label_studio.sdk("import_tasks", project=second_project, tasks=json.loads(ours.read_text()))
    shown_tasks = label_studio.sdk("tasks", project=second_project)["tasks"]
    assert len(shown_tasks) == 4 and all(len(t["predictions"]) == 1 for t in shown_tasks)
    assert all(t["data"]["png"].startswith("data:image/png;base64,") for t in shown_tasks)
    target = next(t for t in shown_tasks if not verdicts(database_url, uuid.UUID(t["data"][ls.ITEM_KEY])))
    target_item = uuid.UUID(target["data"][ls.ITEM_KEY])
    label = target["predictions"][0]["result"][0]["value"]["choices"][0]
    label_studio.sdk("annotate", task=target["id"], result=choice(label, config))
    export = tmp_path / "exported-again.json"
    export.write_text(json.dumps(label_studio.sdk("export", project=second_project)))
    done = loop_cli(env, "review", "import", "--format", "label-studio", str(export), "--admin", "root")
    assert done.returncode == 0 and "1 recorded" in done.stderr, done.stderr
    assert verdicts(database_url, target_item) == [(reviewer, "correct", None)]
    done = loop_cli(env, "review", "import", "--format", "label-studio", str(export), "--admin", "root")
    assert done.returncode == 0 and "1 unchanged" in done.stderr, done.stderr
