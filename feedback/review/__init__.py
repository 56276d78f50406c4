"""The review loop, all its SQL by subject: users and tokens (`users`), the audit log (`audit`),
the queue with its claims and leases (`queue`, narrowed by `filters`), verdicts and the other
revisions of a label (`verdicts`), browsing and counts (`browsing`); the moderation rules and
agreement figures they apply are pure functions (`moderation`).

The names callers use are re-exported here, so that `from feedback import review` reads
`review.claim(...)`, with the domain errors these functions raise.
"""

from feedback.errors import Conflict, Invalid, NotFound
from feedback.review.audit import audit, audit_log
from feedback.review.browsing import (
    Item,
    Page,
    counts,
    decode_cursor,
    encode_cursor,
    final_labels,
    list_items,
    opinions,
)
from feedback.review.filters import ItemFilter, SortKey
from feedback.review.queue import Claimed, Strategy, claim
from feedback.review.users import (
    USER_NAME_PATTERN,
    Role,
    User,
    authenticate,
    create_user,
    get_user,
    hash_token,
    list_users,
    user_name,
)
from feedback.review.verdicts import (
    ItemState,
    VerdictIn,
    add_sample,
    erase_input,
    history,
    record_verdicts,
    resolve,
    undo,
)

__all__ = [
    "USER_NAME_PATTERN",
    "Claimed",
    "Conflict",
    "Invalid",
    "Item",
    "ItemFilter",
    "ItemState",
    "NotFound",
    "Page",
    "Role",
    "SortKey",
    "Strategy",
    "User",
    "VerdictIn",
    "add_sample",
    "audit",
    "audit_log",
    "authenticate",
    "claim",
    "counts",
    "create_user",
    "decode_cursor",
    "encode_cursor",
    "erase_input",
    "final_labels",
    "get_user",
    "hash_token",
    "history",
    "list_items",
    "list_users",
    "opinions",
    "record_verdicts",
    "resolve",
    "undo",
    "user_name",
]
