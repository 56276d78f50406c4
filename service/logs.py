"""The worker's logging: BentoML configures only its own loggers, so ours are set up here."""

from __future__ import annotations

import logging

from pydantic import ValidationError


class _QuietClientErrors(logging.Filter):
    """Bad request bodies are the client's error: log them in one line, without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ValidationError):
            record.msg = f"{record.getMessage()}: invalid request body"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _log_to_stderr(*names: str) -> None:
    """Our loggers (swaps, fallbacks, spool replays) show on stderr beside BentoML's."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
    for name in names:
        named = logging.getLogger(name)
        if not named.handlers:
            named.addHandler(handler)
            named.setLevel(logging.INFO)
            named.propagate = False


def set_up() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())
    _log_to_stderr("service", "feedback", "models")
