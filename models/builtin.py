"""The model that ships with the project, as the layers above know it: by role, never by name.

Serving, review and the API docs need a default model and an example input; they take both from
here, so only `models/` says which model that is.
"""

from __future__ import annotations

from typing import Any

from models import digits
from models.signature import Signature

DEFAULT_MODEL_NAME = digits.DEFAULT_MODEL_NAME


def example_input() -> list[Any]:
    """One sample of the built-in model as a client sends it (for the API's examples)."""
    sample: list[Any] = digits.load().images[0].tolist()
    return sample


def signature() -> Signature:
    return digits.digits_signature()
