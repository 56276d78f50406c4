"""The field types of the service's bodies, paths and queries, each written once: what the OpenAPI
schema says of a field is its whole check.

- `ItemId` (a UUIDv7, as text), `Instant` (an RFC 3339 date-time, nothing else), `ModelVersion`
  (a BentoML tag's version); `Number`, `Integer` and `Flag` (a body's JSON number, integer and
  boolean, nothing that merely converts to one).
- Text Postgres can hold (no NUL character): `ModelName` (a model's name), `Filter` (a filter's
  text: a model, version or label in a query; `Text` in a body), `Name` (a label), `Reason` (says something), `UserName`
  (the store's pattern, `feedback.review.USER_NAME_PATTERN`), `TagKey` and `TagValue`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, Strict, StringConstraints, WithJsonSchema

from feedback import review as rs
from feedback.predictions.records import unstorable_text

NO_NUL = r"^[^\x00]*$"  # text Postgres can hold
UUID7 = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-7[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
RFC3339 = r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$"
TAG_PART = r"^[A-Za-z0-9]([-._A-Za-z0-9]{0,61}[A-Za-z0-9])?$"


def _text_matching(pattern: str, what: str) -> Callable[[Any], Any]:
    compiled = re.compile(pattern)

    def check(value: Any) -> Any:
        if not isinstance(value, str) or compiled.match(value) is None:
            raise ValueError(f"not {what}")
        return value

    return check


ItemId = Annotated[
    uuid.UUID,
    BeforeValidator(_text_matching(UUID7, "a UUIDv7 (a prediction id)")),
    WithJsonSchema({"type": "string", "format": "uuid", "pattern": UUID7}),
]
Instant = Annotated[
    datetime,
    BeforeValidator(_text_matching(RFC3339, "an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z")),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339}),
]
ModelVersion = Annotated[
    str,
    BeforeValidator(_text_matching(TAG_PART, "a model version: letters, digits, '-', '_' and '.', at most 63")),
    WithJsonSchema({"type": "string", "pattern": TAG_PART, "maxLength": 63}),
]
# A JSON body's scalars as JSON types them: no boolean for a number, no numeral in a string.
Number = Annotated[float, Strict()]
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]

MODEL_NAME_MAX = 200  # characters of a model's name, a version or a label a filter names
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MODEL_NAME_MAX, pattern=NO_NUL)]
Text = ModelName  # a model's version or label, as a filter names it in a body
Filter = Annotated[str, StringConstraints(max_length=MODEL_NAME_MAX, pattern=NO_NUL)]  # a query's, may be empty
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL)]
# A reason says something (not only spaces).
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")]
UserName = Annotated[
    str,
    StringConstraints(pattern=rs.USER_NAME_PATTERN),
    Field(
        description="1 to 64 letters, digits, '.', '_' or '-', starting and ending with a letter or digit; "
        "stored in lower case."
    ),
]


def _storable(text: str) -> str:
    problem = unstorable_text(text)
    if problem is not None:
        raise ValueError(f"the tag {problem}")
    return text


TagKey = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_storable)]
TagValue = Annotated[str, StringConstraints(max_length=256), AfterValidator(_storable)]
