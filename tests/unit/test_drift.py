"""The demo's drift: digits moved by one or two pixels, blank where uncovered."""

from __future__ import annotations

import numpy as np
import pytest

from models.builtin import demo_task, moved

pytestmark = pytest.mark.unit


def test_each_image_moves_by_one_or_two_pixels_and_keeps_what_stays_inside() -> None:
    dot = np.zeros((400, 8, 8), np.float32)
    dot[:, 3, 4] = 7  # one pixel, far enough from every edge to stay inside
    out = moved(dot, np.random.default_rng(0))
    shifts = set()
    for image in out:
        ((y, x),) = np.argwhere(image)
        dy, dx = int(y) - 3, int(x) - 4
        assert max(abs(dy), abs(dx)) <= 2 and abs(dy) + abs(dx) >= 2 and image.sum() == 7
        shifts.add((dy, dx))
    assert len(shifts) == 20  # every move within reach: 25 less the 5 within one step of none


def test_what_leaves_the_image_is_lost_and_the_rest_is_blank() -> None:
    full = np.ones((50, 8, 8), np.float32)
    out = moved(full, np.random.default_rng(1))
    # Moving by (dy, dx) keeps (8 - |dy|) x (8 - |dx|) pixels of the full image, the rest blank.
    assert {int(image.sum()) for image in out} == {49, 48, 42, 36}  # (1, 1), (2, 0), (2, 1), (2, 2) and mirrors


def test_the_drifted_traffic_is_the_same_for_the_same_seed_and_differs_from_the_data() -> None:
    task = demo_task()
    rows = np.arange(20)
    first, again = task.drifted(rows, seed=3), task.drifted(rows, seed=3)
    assert np.array_equal(first, again) and first.shape == task.inputs[rows].shape
    assert not any(np.array_equal(a, b) for a, b in zip(first, task.inputs[rows], strict=True))
