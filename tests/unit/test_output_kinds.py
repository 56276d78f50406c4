"""Scores by what a graph answers: logits are softmaxed, probabilities kept, log probabilities exponentiated."""

from __future__ import annotations

import numpy as np
import pytest

from models.importer import found_output_kind
from models.signature import postprocess, softmax, to_probabilities
from models.spec import parse

pytestmark = pytest.mark.unit

LOGITS = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)


def test_each_kind_gives_the_same_probabilities() -> None:
    probabilities = softmax(LOGITS)
    np.testing.assert_allclose(to_probabilities(LOGITS, "logits"), probabilities, atol=1e-7)
    np.testing.assert_allclose(to_probabilities(probabilities, "probabilities"), probabilities, atol=1e-7)
    np.testing.assert_allclose(to_probabilities(np.log(probabilities), "log_probabilities"), probabilities, atol=1e-6)
    with pytest.raises(ValueError, match="unknown output kind"):
        to_probabilities(LOGITS, "odds")


def test_probabilities_are_not_softmaxed_twice() -> None:
    """Two classes: softmax of probabilities can never pass 0.731; the model's own 0.99 must come through."""
    answered = postprocess(np.array([[0.99, 0.01], [0.2, 0.8]], np.float32), "probabilities")
    np.testing.assert_allclose(answered.confidences, [0.99, 0.8], atol=1e-7)
    assert answered.labels.tolist() == [0, 1]
    twice = postprocess(np.array([[0.99, 0.01]], np.float32))  # what a logits declaration would do
    assert float(twice.confidences[0]) < 0.731


def test_the_kind_of_a_probe_batch_is_found() -> None:
    probabilities = softmax(LOGITS)
    assert found_output_kind(probabilities) == "probabilities"
    assert found_output_kind(np.log(probabilities)) == "log_probabilities"
    assert found_output_kind(LOGITS) == "logits"
    assert found_output_kind(np.array([[0.3, 0.3]], np.float32)) == "logits"  # non-negative, but not summing to 1


def test_a_spec_without_the_field_keeps_the_meaning_it_had() -> None:
    spec = parse({"input": {"kind": "tensor", "shape": [2], "min_value": 0, "max_value": 1}, "classes": ["a", "b"]})
    assert spec.output_kind == "logits"
    with pytest.raises(ValueError, match="output_kind"):
        parse({**spec.to_dict(), "output_kind": "softmax"})
