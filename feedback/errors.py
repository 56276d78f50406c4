"""The domain exceptions every layer raises: raised once, where the problem is found, with a message
that says what is wrong, and answered in one place by each face (the HTTP routes' problem details,
the command line's messages), which map the class, never the message.
"""

from __future__ import annotations


class NotFound(Exception):
    """No such item (prediction, version, user)."""


class Conflict(Exception):
    """The request contradicts the current state (e.g. a verdict without a live lease)."""


class Invalid(ValueError):
    """A verdict, label, name or filter that cannot be accepted; the message says why."""


class Unavailable(RuntimeError):
    """A server the request needs (Redis, Postgres, the inference engine) cannot be reached now."""


class Overloaded(RuntimeError):
    """More work than can be taken on now; the same request may succeed later."""


class TooLarge(ValueError):
    """A body, batch or file over a configured limit; the message names the limit."""
