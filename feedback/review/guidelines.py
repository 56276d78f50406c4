"""Guidelines per model: Markdown an admin writes, versioned (a new version is published, none is
edited). A reviewer reads each new version once before their next claim (`unread` is what
`queue.claim` checks), and each verdict records the version of its item's model's guidelines it was
given under (`verdicts`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from feedback.errors import Invalid, NotFound
from feedback.review.audit import audit
from feedback.review.users import User

MAX_CHARACTERS = 100_000  # within the body limit of the admin routes even when JSON escapes every character


@dataclass(frozen=True)
class Guidelines:
    model_name: str
    version: int
    markdown: str
    created_by: str | None
    created_at: datetime

    @property
    def html(self) -> str:
        """The Markdown as HTML, raw HTML in it escaped (CommonMark, markdown-it-py)."""
        from markdown_it import MarkdownIt

        return str(MarkdownIt("commonmark", {"html": False}).render(self.markdown))


def publish(*, conn: psycopg.Connection, admin: User, model_name: str, markdown: str) -> Guidelines:
    """A new version of the model's guidelines (the next number), audited."""
    if not markdown.strip():
        raise Invalid("guidelines cannot be empty")
    if len(markdown) > MAX_CHARACTERS:
        raise Invalid(f"guidelines of {len(markdown)} characters; at most {MAX_CHARACTERS}")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('guidelines:' || %s))", (model_name,))
        row = conn.execute(
            "INSERT INTO guidelines (model_name, version, markdown, created_by)"
            " SELECT %s, coalesce(max(version), 0) + 1, %s, %s FROM guidelines WHERE model_name = %s"
            " RETURNING version",
            (model_name, markdown, admin.id, model_name),
        ).fetchone()
        assert row is not None
        audit(conn, admin, "guidelines", model_name, version=int(row[0]))
    found = history(conn=conn, model_name=model_name)
    return found[-1]


def history(*, conn: psycopg.Connection, model_name: str) -> list[Guidelines]:
    """Every version of the model's guidelines, oldest first."""
    rows = conn.execute(
        "SELECT g.model_name, g.version, g.markdown, u.name, g.created_at FROM guidelines g"
        " LEFT JOIN users u ON u.id = g.created_by WHERE g.model_name = %s ORDER BY g.version",
        (model_name,),
    ).fetchall()
    return [Guidelines(r[0], int(r[1]), r[2], r[3], r[4]) for r in rows]


def current(*, conn: psycopg.Connection, model_name: str) -> Guidelines | None:
    found = history(conn=conn, model_name=model_name)
    return found[-1] if found else None


def mark_read(*, conn: psycopg.Connection, user: User, model_name: str, version: int) -> None:
    """The user read that version (reading it twice changes nothing)."""
    if not any(g.version == version for g in history(conn=conn, model_name=model_name)):
        raise NotFound(f"{model_name} has no guidelines version {version}")
    conn.execute(
        "INSERT INTO guidelines_read (user_id, model_name, version) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
        (user.id, model_name, version),
    )


def unread(*, conn: psycopg.Connection, user: User, model_name: str | None = None) -> list[Guidelines]:
    """The current guidelines the user has not read (of `model_name`, or of every model)."""
    rows = conn.execute(
        "SELECT g.model_name, g.version, g.markdown, u.name, g.created_at FROM guidelines g"
        " LEFT JOIN users u ON u.id = g.created_by"
        " WHERE g.version = (SELECT max(version) FROM guidelines h WHERE h.model_name = g.model_name)"
        " AND (%(model)s::text IS NULL OR g.model_name = %(model)s)"
        " AND NOT EXISTS (SELECT 1 FROM guidelines_read r WHERE r.user_id = %(user)s"
        " AND r.model_name = g.model_name AND r.version = g.version) ORDER BY g.model_name",
        {"model": model_name, "user": user.id},
    ).fetchall()
    return [Guidelines(r[0], int(r[1]), r[2], r[3], r[4]) for r in rows]
