"""Live model health from the prediction log: hourly sketches folded in once each (`folding`, run
by `loop ingest`), read as windows against each version's reference (`reading`).

A version's reference (`models.health.Reference`) is its run over the model's current validation
version, computed once and kept, or a window of its own predictions a team picked
(`choose_reference`). `report` reads the hourly sketches of a period, adds them into windows of the
size asked for and compares each with the reference: drift per kind, the accuracy the confidences
promise, and the accuracy reviewers judged on the window's items.
"""

from feedback.health.folding import (
    EPOCH,
    WINDOW_S,
    HealthConfig,
    advance,
    advance_all,
    choose_reference,
    reference,
    window_start,
)
from feedback.health.reading import Report, Window, drifted_segments, report

__all__ = [
    "EPOCH",
    "WINDOW_S",
    "HealthConfig",
    "Report",
    "Window",
    "advance",
    "advance_all",
    "choose_reference",
    "drifted_segments",
    "reference",
    "report",
    "window_start",
]
