"""The supervisor behind `loop serve`, with stand-in children: a dead child is started again after
its back-off, one that dies too often stops everything, and SIGTERM stops the children."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import psutil
import pytest

from service import supervisor

pytestmark = pytest.mark.unit

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_child_that_dies_too_often_stops_everything_with_its_code(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervisor, "RESTARTS_PER_MINUTE", 1)
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    with caplog.at_level(logging.INFO, logger="loop"):
        code = supervisor.supervise({"service": SLEEPER, "ingest": failing}, dict(os.environ))
    assert code == 3
    messages = [r.getMessage() for r in caplog.records]
    assert "ingest exited with code 3; starting it again in 1 s" in messages
    assert any(m.startswith("ingest started again (pid ") for m in messages)
    assert "ingest exited 2 times in a minute (last code 3); stopping" in messages
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]


def test_sigterm_stops_the_children_and_exits_cleanly() -> None:
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    before = signal.getsignal(signal.SIGTERM)
    try:
        code = supervisor.supervise({"service": SLEEPER, "ingest": SLEEPER}, dict(os.environ))
    finally:
        timer.cancel()
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]
