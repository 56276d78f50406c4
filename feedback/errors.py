"""The domain exceptions every layer above `models/` raises: raised once, where the problem is
found, with a message that says what is wrong, and answered in one place by each face (the HTTP
routes' problem details in `service.problems`, the command line's messages), which map the class,
never the message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class DomainError(Exception):
    """A request the service will not carry out, and why (the message)."""


class Invalid(DomainError, ValueError):
    """A verdict, label, name, filter or field that cannot be accepted; the message says why.
    `fields`, when given: each invalid field (`field`, `message`), as a form would show them."""

    def __init__(self, message: str, *, fields: Sequence[Mapping[str, str]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields


class Malformed(Invalid):
    """A request whose content cannot be read as what it must be: a sample not of the model's
    shape, bytes that are no image, text that is not base64, a form that does not parse."""


class Unsupported(Invalid):
    """Content of a kind the target does not take (uploaded files for a model of numbers)."""


class TooLarge(Invalid):
    """A body, batch or file over a configured limit; the message names the limit."""


class NotFound(DomainError, LookupError):
    """No such item (prediction, version, user, model)."""


class Conflict(DomainError):
    """The request contradicts the current state (e.g. a verdict without a live lease)."""


class Unauthenticated(DomainError):
    """No credentials, or credentials no one holds."""


class Forbidden(DomainError):
    """The caller is known but may not do this."""


class Unavailable(DomainError, RuntimeError):
    """A server the request needs (Redis, Postgres, the inference engine, a loaded model) cannot
    be reached or used now; the same request may succeed later."""


class Overloaded(Unavailable):
    """More work than can be taken on now; the same request may succeed in a moment."""


class Busy(Overloaded):
    """The caller sent more requests at once than are taken: theirs to slow down."""
