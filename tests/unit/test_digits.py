from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models import digits

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data() -> digits.Digits:
    return digits.load()


def test_split_is_disjoint_complete_and_stratified(data: digits.Digits) -> None:
    split = digits.make_split(data, seed=3)
    train, val = set(split.train_indices), set(split.validation_indices)
    assert not train & val
    assert train | val == set(range(len(data.labels)))
    shares = Counter(int(data.labels[i]) for i in val)
    for label, count in Counter(int(x) for x in data.labels).items():
        assert abs(shares[label] / count - 0.2) < 0.02


def test_split_depends_only_on_the_seed(data: digits.Digits) -> None:
    assert digits.make_split(data, seed=3) == digits.make_split(data, seed=3)
    assert digits.make_split(data, seed=3).split_id != digits.make_split(data, seed=4).split_id


def test_frozen_split_is_reused_not_redrawn(tmp_path: Path, data: digits.Digits) -> None:
    path = tmp_path / "split.json"
    first = digits.load_or_create_split(path, data, seed=1)
    again = digits.load_or_create_split(path, data, seed=999)  # another seed must not redraw it
    assert again == first


def test_frozen_split_refuses_other_data(tmp_path: Path, data: digits.Digits) -> None:
    path = tmp_path / "split.json"
    digits.load_or_create_split(path, data, seed=1)
    changed = replace(data, labels=np.roll(data.labels, 1))
    with pytest.raises(ValueError, match="create a new validation version"):
        digits.load_or_create_split(path, changed, seed=1)


def test_the_apis_example_is_the_first_digit_of_the_data(data: digits.Digits) -> None:
    assert np.array_equal(np.asarray(digits.FIRST_DIGIT, dtype=np.float32), data.images[0])
    assert data.labels[0] == 0
