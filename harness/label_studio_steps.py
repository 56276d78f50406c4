"""What a team does in Label Studio, step by step, with Label Studio's own SDK: run under Label
Studio's Python (`harness.label_studio.LabelStudio.sdk`), not the service's.

    python label_studio_steps.py URL TOKEN STEP ARGUMENTS_JSON

prints the step's answer as JSON on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from label_studio_sdk import LabelStudio


def project(ls: LabelStudio, title: str, label_config: str) -> dict[str, Any]:
    """A project with this labelling configuration."""
    made = ls.projects.create(title=title, label_config=label_config)
    return {"project": made.id}


def connect(ls: LabelStudio, project: int, url: str, token: str) -> dict[str, Any]:
    """Connect the model's ML backend, then give the webhook Label Studio made for it our token."""
    backend = ls.ml.create(project=project, url=url, title="loop")
    hooks = [h for h in ls.webhooks.list(project=str(project)) if h.url.rstrip("/") == url.rstrip("/") + "/webhook"]
    for hook in hooks:
        ls.webhooks.update(hook.id, headers={"Authorization": f"Bearer {token}"})
    return {"backend": backend.id, "state": backend.state, "error": backend.error_message, "webhooks": len(hooks)}


def import_tasks(ls: LabelStudio, project: int, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    ls.projects.import_tasks(project, request=tasks)
    return {"tasks": [t.id for t in ls.tasks.list(project=project)]}


def predict(ls: LabelStudio, project: int) -> dict[str, Any]:
    """Ask the connected backend for predictions of every task (the Data Manager's action)."""
    ls.actions.create(id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []})
    return tasks(ls, project)


def tasks(ls: LabelStudio, project: int) -> dict[str, Any]:
    """Every task with its predictions and annotations."""
    found = []
    for task in ls.tasks.list(project=project, fields="all"):
        predictions = [
            {"score": p.score, "model_version": p.model_version, "result": p.result} for p in task.predictions or []
        ]
        annotations = [{"id": a.id, "result": a.result} for a in task.annotations or []]
        found.append({"id": task.id, "data": task.data, "predictions": predictions, "annotations": annotations})
    return {"tasks": found}


def annotate(ls: LabelStudio, task: int, result: list[dict[str, Any]]) -> dict[str, Any]:
    made = ls.annotations.create(id=task, result=result)
    return {"annotation": made.id, "user": made.completed_by}


def change(ls: LabelStudio, annotation: int, result: list[dict[str, Any]]) -> dict[str, Any]:
    ls.annotations.update(annotation, result=result)
    return {"annotation": annotation}


def delete(ls: LabelStudio, annotation: int) -> dict[str, Any]:
    ls.annotations.delete(annotation)
    return {"annotation": annotation}


def export(ls: LabelStudio, project: int) -> Any:
    """The project's JSON export, as a team downloads it."""
    body = b"".join(ls.projects.exports.download_sync(project, export_type="JSON", download_all_tasks=True))
    return json.loads(body)


STEPS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (project, connect, import_tasks, predict, tasks, annotate, change, delete, export)
}


if __name__ == "__main__":
    url, token, step, arguments = sys.argv[1:5]
    client = LabelStudio(base_url=url, api_key=token)
    json.dump(STEPS[step](client, **json.loads(arguments)), sys.stdout)
