"""Reviewers and admins: canonical names, roles, and tokens (only their hashes are stored).

Functions take a connection and keyword arguments; queries are parameterised, always.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

import psycopg

from feedback.errors import Conflict, Invalid
from feedback.review.audit import audit


class Role(StrEnum):
    REVIEWER = "reviewer"  # claims items and gives verdicts
    ADMIN = "admin"  # also resolves disputes, erases inputs, reads the audit log, manages users


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: Role


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# A user name as the HTTP API takes it (any case); stored folded to lower case.
USER_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"
_USER_NAME = re.compile(USER_NAME_PATTERN)


def user_name(raw: str) -> str:
    """The canonical form of a user name, or `Invalid` saying why there is none.

    Names appear in histories and agreement reports, so two must never look alike: the name is
    NFKC-normalised (fullwidth and other compatibility forms become plain letters) and
    lower-cased, then must be 1 to 64 ASCII letters, digits, '.', '_' or '-', starting and
    ending with a letter or digit.
    """
    name = _folded(raw)
    if not _USER_NAME.fullmatch(name):
        raise Invalid(
            f"user name {raw!r} is not allowed: use 1 to 64 letters a-z, digits, '.', '_' or '-',"
            " starting and ending with a letter or digit"
        )
    return name


def _folded(raw: str) -> str:
    return unicodedata.normalize("NFKC", raw).strip().lower()


def create_user(*, conn: psycopg.Connection, name: str, role: Role, actor: User | None = None) -> tuple[User, str]:
    """Create a user under the canonical form of `name` (see `user_name`); returns it with its
    token, which is shown this once and never stored."""
    name = user_name(name)
    token = secrets.token_urlsafe(32)
    with conn.transaction():
        try:
            row = conn.execute(
                "INSERT INTO users (name, role, token_hash) VALUES (%s, %s, %s) RETURNING id",
                (name, role.value, hash_token(token)),
            ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"a user named {name!r} exists") from None
        except psycopg.errors.CheckViolation:
            raise Invalid("a user name has 1 to 64 characters") from None
        assert row is not None
        user = User(id=int(row[0]), name=name, role=role)
        audit(conn, actor, "user.create", name, role=role.value)
    return user, token


def authenticate(*, conn: psycopg.Connection, token: str) -> User | None:
    row = conn.execute("SELECT id, name, role FROM users WHERE token_hash = %s", (hash_token(token),)).fetchone()
    return None if row is None else User(id=int(row[0]), name=row[1], role=Role(row[2]))


def get_user(*, conn: psycopg.Connection, name: str) -> User | None:
    row = conn.execute("SELECT id, name, role FROM users WHERE name = %s", (_folded(name),)).fetchone()
    return None if row is None else User(id=int(row[0]), name=row[1], role=Role(row[2]))


def list_users(*, conn: psycopg.Connection) -> list[User]:
    rows = conn.execute("SELECT id, name, role FROM users ORDER BY id").fetchall()
    return [User(id=int(r[0]), name=r[1], role=Role(r[2])) for r in rows]
