"""Tests for fwsvd.evaluation.metrics on hand-computable cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fwsvd.errors import DataError
from fwsvd.evaluation.metrics import classification_metrics, headline_metric, perplexity, regression_metrics


def test_classification_hand_computed():
    # TP=2 (idx 1, 2), FP=1 (idx 3), FN=1 (idx 4), TN=1 (idx 0): precision 2/3, recall 2/3.
    result = classification_metrics([0, 1, 1, 0, 1], [0, 1, 1, 1, 0], num_labels=2)
    assert result["accuracy"] == pytest.approx(3 / 5, abs=1e-12)
    assert result["f1"] == pytest.approx(2 / 3, abs=1e-12)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert result["mcc"] == pytest.approx(1 / 6, abs=1e-12)
    assert all(type(value) is float for value in result.values())


def test_mcc_perfect_and_inverse():
    assert classification_metrics([0, 1, 0, 1], [0, 1, 0, 1], 2)["mcc"] == pytest.approx(1.0, abs=1e-12)
    assert classification_metrics([0, 1, 0, 1], [1, 0, 1, 0], 2)["mcc"] == pytest.approx(-1.0, abs=1e-12)


def test_multiclass_has_no_f1():
    result = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), num_labels=3)
    assert set(result) == {"accuracy", "mcc"}
    assert result["accuracy"] == pytest.approx(0.75, abs=1e-12)


def test_constant_predictions_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = classification_metrics([0, 1, 1, 0], [1, 1, 1, 1], 2)
        assert result["mcc"] == 0.0
        assert result["f1"] == pytest.approx(2 / 3, abs=1e-12)
        assert classification_metrics([0, 0], [0, 0], 2) == {"accuracy": 1.0, "f1": 0.0, "mcc": 0.0}
        regression = regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert math.isnan(regression["pearson"]) and math.isnan(regression["spearman"])
    assert regression["mse"] == pytest.approx(2 / 3, abs=1e-12)


def test_regression_linear_and_monotone():
    x = [0.0, 1.0, 2.5, 4.0]
    linear = regression_metrics(x, [3 * v - 1 for v in x])
    assert linear["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert linear["spearman"] == pytest.approx(1.0, abs=1e-12)
    monotone = regression_metrics(x, [math.exp(v) for v in x])
    assert monotone["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert monotone["pearson"] < 1.0
    assert regression_metrics(x, x)["mse"] == 0.0
    assert all(type(value) is float for value in linear.values())


def test_length_mismatch_and_empty():
    with pytest.raises(DataError, match="3 targets but 2 predictions"):
        classification_metrics([0, 1, 1], [0, 1], 2)
    with pytest.raises(DataError, match="no examples"):
        regression_metrics([], [])


@pytest.mark.parametrize(
    ("layout", "is_regression", "expected"),
    [
        ("cola", False, "mcc"),
        ("mrpc", False, "f1"),
        ("qqp", False, "f1"),
        ("stsb", True, "pearson"),
        ("single", True, "pearson"),
        ("single", False, "accuracy"),
        ("pair", False, "accuracy"),
        ("mnli", False, "accuracy"),
        ("qnli", False, "accuracy"),
    ],
)
def test_headline_metric(layout, is_regression, expected):
    assert headline_metric(layout, is_regression) == expected


def test_perplexity():
    assert perplexity(10.0, 5) == pytest.approx(math.exp(2.0), rel=1e-12)
    assert perplexity(0.0, 3) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(DataError, match="0 tokens"):
        perplexity(1.0, 0)
