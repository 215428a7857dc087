"""GLUE-style task metrics, computed with scikit-learn and SciPy.

All functions return plain Python floats, so results serialise to JSON as they are. scikit-learn
and SciPy are imported where they are used, so that a machine without them (a bare GPU box running
``benchmarks/gpu_check.py``) can still import the evaluation package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fwsvd.errors import DataError

__all__ = ["classification_metrics", "headline_metric", "perplexity", "regression_metrics"]

# Layouts (see fwsvd.data.Examples.layout) whose GLUE headline metric is not accuracy.
_HEADLINE_BY_LAYOUT: dict[str, str] = {
    "cola": "mcc",
    "mrpc": "f1",
    "qqp": "f1",
    "stsb": "pearson",
}


def _as_arrays(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(y_true).reshape(-1)
    pred = np.asarray(y_pred).reshape(-1)
    if true.shape != pred.shape:
        raise DataError(
            f"got {true.size} targets but {pred.size} predictions: pass one prediction per example"
        )
    if true.size == 0:
        raise DataError("no examples to score: pass at least one target and prediction")
    return true, pred


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int
) -> dict[str, float]:
    """Accuracy, Matthews correlation and (for two classes) F1 of class 1.

    Args:
        y_true: Target class ids.
        y_pred: Predicted class ids.
        num_labels: Number of classes of the model; ``f1`` is reported only when it is 2.

    Returns:
        ``{"accuracy", "mcc"}``, plus ``"f1"`` (binary F1 of class 1, 0 when undefined) for
        two-class tasks.

    Raises:
        DataError: If the inputs are empty or differ in length.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    true, pred = _as_arrays(y_true, y_pred)
    result = {
        "accuracy": float(accuracy_score(true, pred)),
    }
    if num_labels == 2:
        # labels=[0, 1] keeps F1 defined for batches where only one class occurs; zero_division=0
        # scores "no positive predicted and none present" as 0 without a warning.
        result["f1"] = float(f1_score(true, pred, labels=[0, 1], pos_label=1, average="binary", zero_division=0))
    # MCC is undefined when targets or predictions are constant; sklearn returns 0 then, the
    # conventional value. With a single class overall it also warns, so answer 0 directly.
    single_class = np.unique(np.concatenate([true, pred])).size < 2
    result["mcc"] = 0.0 if single_class else float(matthews_corrcoef(true, pred))
    return result


def regression_metrics(
    y_true: Sequence[float] | np.ndarray, y_pred: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Pearson and Spearman correlation and mean squared error.

    Args:
        y_true: Target values.
        y_pred: Predicted values.

    Returns:
        ``{"pearson", "spearman", "mse"}``. The correlations are NaN when either side is
        constant (or there are fewer than two examples), where they are undefined.

    Raises:
        DataError: If the inputs are empty or differ in length.
    """
    from scipy import stats
    from sklearn.metrics import mean_squared_error

    true, pred = _as_arrays(y_true, y_pred)
    true = true.astype(np.float64)
    pred = pred.astype(np.float64)
    # Correlation is undefined for constant input; SciPy would warn and return NaN, so skip it.
    defined = true.size >= 2 and np.ptp(true) > 0 and np.ptp(pred) > 0
    pearson = float(stats.pearsonr(true, pred).statistic) if defined else math.nan
    spearman = float(stats.spearmanr(true, pred).statistic) if defined else math.nan
    return {
        "pearson": pearson,
        "spearman": spearman,
        "mse": float(mean_squared_error(true, pred)),
    }


def headline_metric(layout: str, is_regression: bool) -> str:
    """The metric GLUE reports for a task layout.

    Args:
        layout: The layout tag from :attr:`fwsvd.data.Examples.layout`.
        is_regression: Whether the task is a regression.

    Returns:
        ``"pearson"`` for regression (and STS-B), ``"mcc"`` for CoLA, ``"f1"`` for MRPC and QQP,
        ``"accuracy"`` otherwise.
    """
    if is_regression:
        return "pearson"
    return _HEADLINE_BY_LAYOUT.get(layout, "accuracy")


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Perplexity from a summed negative log-likelihood: ``exp(total_nll / n_tokens)``.

    Args:
        total_nll: Sum of per-token negative log-likelihoods, in nats.
        n_tokens: Number of predicted tokens.

    Returns:
        The perplexity (``inf`` if it overflows a float).

    Raises:
        DataError: If ``n_tokens`` is not positive.
    """
    if n_tokens <= 0:
        raise DataError(
            f"cannot compute perplexity over {n_tokens} tokens: give text with at least one full block"
        )
    mean = float(total_nll) / n_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf
