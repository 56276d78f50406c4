"""Label Studio as a front end to the review queue: a project's labelling configuration checked
against a model's classes, tasks and predictions in Label Studio's JSON, and its annotations
recorded as verdicts.

A Label Studio user is the reviewer `label-studio.<their id>` here (made on first sight). Each of
their annotations is remembered with what it last said (`label_studio_annotations`): an update
records a new verdict only when the label changed, a deletion takes the reviewer's opinion back (an
`undo` revision), and an event delivered twice or an export imported twice records nothing new.

A task is found by the item id our export put in its data (`loop_item`), else by the tag
`label_studio.task` that `/predict` gave the prediction it answered for it.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from xml.etree import ElementTree

import psycopg

from feedback.errors import Invalid, NotFound
from feedback.predictions import blobs
from feedback.predictions.records import created_at as uuid_created_at
from feedback.review.browsing import list_items
from feedback.review.filters import ItemFilter
from feedback.review.moderation import Verdict
from feedback.review.users import Role, User, create_user, get_user
from feedback.review.verdicts import record_outside

TASK_TAG = "label_studio.task"  # the tag a prediction answered to Label Studio carries: the task's id
PROJECT_TAG = "label_studio.project"
ITEM_KEY = "loop_item"  # the member of an exported task's data that holds our item's id
SKIPPED = "<skipped>"  # what a skipped (cancelled) annotation says
MAX_CONFIG_CHARS = 100_000


@dataclass(frozen=True)
class LabelConfig:
    """What a classification project's labelling configuration names: its `<Choices>` tag (its name
    and the object tag it labels) with the choices offered, and the task data member shown."""

    from_name: str
    to_name: str
    data_key: str
    choices: tuple[str, ...]

    @classmethod
    def default(cls, classes: Sequence[str]) -> LabelConfig:
        return cls(from_name="label", to_name="image", data_key="image", choices=tuple(classes))

    def xml(self) -> str:
        """The configuration as Label Studio takes it (what `default` describes)."""
        choices = "".join(f'<Choice value="{_attribute(c)}"/>' for c in self.choices)
        return (
            f'<View><Image name="{_attribute(self.to_name)}" value="${_attribute(self.data_key)}"/>'
            f'<Choices name="{_attribute(self.from_name)}" toName="{_attribute(self.to_name)}" choice="single">'
            f"{choices}</Choices></View>"
        )


def _attribute(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def parse_config(text: str) -> LabelConfig:
    """A labelling configuration's one `<Choices>` tag and what it labels; `Invalid` saying why a
    configuration is not one this model can answer."""
    if len(text) > MAX_CONFIG_CHARS:
        raise Invalid(f"the labelling configuration is over {MAX_CONFIG_CHARS} characters")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise Invalid(f"the labelling configuration is not XML: {exc}") from None
    tags = list(root.iter())
    choices = [t for t in tags if t.tag == "Choices"]
    if len(choices) != 1:
        raise Invalid(f"a classification project has one <Choices> tag; this configuration has {len(choices)}")
    (tag,) = choices
    from_name, to_name = tag.get("name"), tag.get("toName")
    objects = {t.get("name"): t for t in tags if t.get("name") and str(t.get("value", "")).startswith("$")}
    if not from_name or not to_name or to_name not in objects:
        raise Invalid("the <Choices> tag needs a name and a toName naming a tag that shows task data ($key)")
    offered = tuple(str(c.get("value") or c.get("alias") or "") for c in tag.iter("Choice"))
    return LabelConfig(from_name, to_name, str(objects[to_name].get("value"))[1:], offered)


def check_config(config: LabelConfig, model: str, classes: Sequence[str]) -> None:
    """`Invalid` when the project offers other choices than the model's classes."""
    missing = [c for c in classes if c not in config.choices]
    extra = [c for c in config.choices if c not in classes]
    if missing or extra:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"not classes of {model}: {', '.join(extra)}"] if extra else []
        raise Invalid(
            f"the project's choices are not {model}'s classes ({'; '.join(parts)}): offer exactly {', '.join(classes)}"
        )


def prediction(config: LabelConfig, *, label: str, confidence: float, model_version: str) -> dict[str, Any]:
    """A prediction in Label Studio's format: the label chosen, the confidence as its score."""
    result = {"from_name": config.from_name, "to_name": config.to_name, "type": "choices"}
    return {
        "result": [{**result, "value": {"choices": [label]}}],
        "score": round(float(confidence), 6),
        "model_version": model_version,
    }


# -- annotations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelStudioAnnotation:
    """One annotation as Label Studio sends it in a webhook or writes it in an export."""

    id: int
    user: int  # Label Studio's id of who completed it
    task: int | None  # None in a file our export wrote, before Label Studio numbered its tasks
    task_data: dict[str, Any]
    label: str | None  # the choice made; None when it chose nothing
    skipped: bool

    @classmethod
    def read(cls, annotation: dict[str, Any], task: dict[str, Any], from_name: str | None) -> LabelStudioAnnotation:
        """From Label Studio's JSON (`Invalid` for one that lacks what recording needs)."""
        try:
            user = annotation["completed_by"]
            return cls(
                id=int(annotation["id"]),
                user=int(user["id"] if isinstance(user, dict) else user),
                task=None if task.get("id") is None else int(task["id"]),
                task_data=dict(task.get("data") or {}),
                label=chosen(annotation.get("result") or [], from_name),
                skipped=bool(annotation.get("was_cancelled")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Invalid(f"an annotation without its id or completed_by ({exc}), or with a non-integer one") from None

    @property
    def says(self) -> str | None:
        return SKIPPED if self.skipped else self.label


def chosen(result: Iterable[Any], from_name: str | None) -> str | None:
    """The choice an annotation's result made with the `<Choices>` tag `from_name` (any, if None)."""
    for region in result:
        if not isinstance(region, dict) or region.get("type") != "choices":
            continue
        if from_name is not None and region.get("from_name") != from_name:
            continue
        picked = (region.get("value") or {}).get("choices") or []
        if picked:
            return str(picked[0])
    return None


class Outcome(StrEnum):
    RECORDED = "recorded"  # a new verdict
    UNCHANGED = "unchanged"  # it says what it said: nothing new
    WITHDRAWN = "withdrawn"  # deleted: the reviewer's opinion taken back


def reviewer(conn: psycopg.Connection, label_studio_user: int, actor: User) -> User:
    """Our reviewer for a Label Studio user, made on first sight."""
    name = f"label-studio.{label_studio_user}"
    found = get_user(conn=conn, name=name)
    if found is not None:
        return found
    made, _ = create_user(conn=conn, name=name, role=Role.REVIEWER, actor=actor)
    return made


def record(
    conn: psycopg.Connection,
    annotation: LabelStudioAnnotation,
    *,
    actor: User,
    model: str | None,
    labels_of: Callable[[str], Sequence[str] | None],
) -> Outcome:
    """Record an annotation as its user's verdict on the item its task shows, unless it says what
    it said before: `correct` for the model's label, `wrong` with another, `unsure` when skipped."""
    with conn.transaction():
        item, model_name, predicted = _item(conn, annotation.task, annotation.task_data, model)
        said = _remembered(conn, annotation.id)
        if said is not None and said[1] == annotation.says:
            return Outcome.UNCHANGED
        if annotation.says is None:
            raise Invalid(f"annotation {annotation.id} of task {annotation.task} chose no label")
        labels = labels_of(model_name)
        if annotation.label is not None and labels is not None and annotation.label not in labels:
            raise Invalid(f"annotation {annotation.id}: {annotation.label!r} is not a class of {model_name}")
        user = reviewer(conn, annotation.user, actor)
        if annotation.skipped:
            verdict, label = Verdict.UNSURE, None
        elif annotation.label == predicted:
            verdict, label = Verdict.CORRECT, None
        else:
            verdict, label = Verdict.WRONG, annotation.label
        reason = f"Label Studio annotation {annotation.id}"
        revision = record_outside(conn=conn, user=user, prediction_id=item, verdict=verdict, label=label, reason=reason)
        conn.execute(
            "INSERT INTO label_studio_annotations (annotation_id, prediction_id, item_created_at, actor_id, said,"
            " revision) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (annotation_id) DO UPDATE SET"
            " said = EXCLUDED.said, revision = EXCLUDED.revision, updated_at = now()",
            (annotation.id, item, uuid_created_at(item), user.id, annotation.says, revision),
        )
    return Outcome.RECORDED


def withdraw(conn: psycopg.Connection, annotation_id: int) -> Outcome:
    """A deleted annotation: its reviewer's opinion on the item is taken back (once)."""
    with conn.transaction():
        said = _remembered(conn, annotation_id)
        if said is None or said[1] is None:
            return Outcome.UNCHANGED  # never recorded here, or already withdrawn
        (item, actor_id), _ = said
        row = conn.execute("SELECT id, name, role FROM users WHERE id = %s", (actor_id,)).fetchone()
        assert row is not None
        user = User(id=int(row[0]), name=row[1], role=Role(row[2]))
        reason = f"Label Studio annotation {annotation_id} deleted"
        revision = record_outside(
            conn=conn, user=user, prediction_id=item, verdict=Verdict.UNDO, label=None, reason=reason
        )
        conn.execute(
            "UPDATE label_studio_annotations SET said = NULL, revision = %s, updated_at = now()"
            " WHERE annotation_id = %s",
            (revision, annotation_id),
        )
    return Outcome.WITHDRAWN


def _remembered(conn: psycopg.Connection, annotation_id: int) -> tuple[tuple[uuid.UUID, int], str | None] | None:
    """What an annotation last said here (locked for this transaction), or None if never seen."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, annotation_id % 2**31))
    row = conn.execute(
        "SELECT prediction_id, actor_id, said FROM label_studio_annotations WHERE annotation_id = %s",
        (annotation_id,),
    ).fetchone()
    return None if row is None else ((row[0], int(row[1])), row[2])


_LOCK_SPACE = 0x4C53  # advisory locks of this module: one annotation's events one at a time


def _item(
    conn: psycopg.Connection, task: int | None, data: dict[str, Any], model: str | None
) -> tuple[uuid.UUID, str, str]:
    """The item a task shows (id, model, predicted label): the one our export named, else the
    latest prediction answered for the task."""
    if data.get(ITEM_KEY):
        try:
            item = uuid.UUID(str(data[ITEM_KEY]))
        except ValueError:
            raise Invalid(f"task {task}: {ITEM_KEY} is not an item id") from None
        row = conn.execute(
            "SELECT id, model_name, label FROM predictions WHERE created_at = %s AND id = %s",
            (uuid_created_at(item), item),
        ).fetchone()
    elif task is None:
        raise Invalid(f"a task without an id or {ITEM_KEY} in its data: which item it shows is not known")
    else:
        row = conn.execute(
            "SELECT id, model_name, label FROM predictions WHERE tags ? 'label_studio.task'"
            " AND tags ->> 'label_studio.task' = %s AND (%s::text IS NULL OR model_name = %s)"
            " ORDER BY created_at DESC LIMIT 1",
            (str(task), model, model),
        ).fetchone()
    if row is None:
        raise NotFound(f"task {task}: no prediction of ours is stored for it (yet)")
    return row[0], row[1], row[2]


# -- export -----------------------------------------------------------------------------------


def export_tasks(
    conn: psycopg.Connection, filters: ItemFilter, config: LabelConfig, *, limit: int
) -> list[dict[str, Any]]:
    """Tasks for the items `filters` selects (at most `limit`, oldest first), each with its image
    as a data URI and our stored prediction (score = confidence, the model and version)."""
    tasks: list[dict[str, Any]] = []
    cursor = None
    while len(tasks) < limit:
        page = list_items(conn=conn, filters=filters, limit=min(500, limit - len(tasks)), cursor=cursor)
        ids = [i.id for i in page.items if not i.input_erased and i.source != "reviewer"]
        inputs = {
            r[0]: (blobs.read(conn, r[1], r[3]) or b"", r[2])
            for r in conn.execute(
                "SELECT id, input, input_type, input_key FROM predictions WHERE id = ANY(%s)"
                " AND (input IS NOT NULL OR input_key IS NOT NULL)",
                (ids,),
            ).fetchall()
        }
        for item in page.items:
            if item.id not in inputs:
                continue
            data, media_type = inputs[item.id]
            if media_type is None:
                raise Invalid(f"{item.model_name} takes numbers: Label Studio projects here show images")
            uri = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
            version = f"{item.model_name}:{item.model_version}"
            answer = prediction(config, label=item.label, confidence=item.confidence, model_version=version)
            tasks.append({"data": {config.data_key: uri, ITEM_KEY: str(item.id)}, "predictions": [answer]})
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return tasks
