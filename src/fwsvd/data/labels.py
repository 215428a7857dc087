"""Labels: parsing raw label cells, and turning raw labels into model targets."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["label_mapping", "model_label_mapping", "parse_label"]

# Label cells that mean "no label": empty, and the "-" that MNLI/SNLI use when annotators disagree.
_MISSING_LABELS: frozenset[str] = frozenset({"", "-"})
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(
    r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE
)
_DEFAULT_LABEL_RE = re.compile(r"LABEL_\d+")


def parse_label(value: Any) -> int | float | str | None:
    """Raw label as read: int if integer-looking, float if decimal-looking, str otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if text in _MISSING_LABELS:
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    return text


def label_mapping(
    labels: list | None,
    *,
    label2id: Mapping[str, int] | None = None,
    num_labels: int | None = None,
    regression: bool | None = None,
    source: str = "the data",
) -> tuple[list[int] | list[float], bool, dict[str, int] | None]:
    """Turn raw labels into model targets.

    The task is a regression when ``regression`` is True, or (when it is None) when
    ``num_labels == 1``, or when ``num_labels`` is None and the labels are numbers that are not
    all integers. Otherwise it is a classification: integer labels are used as they are; string
    labels are mapped through ``label2id`` when all of them are its keys (exactly, else ignoring
    case), else through their digits when numeric, else through the sorted list of distinct
    strings.

    Args:
        labels: Raw labels, as in :attr:`fwsvd.data.Examples.labels`.
        label2id: The model's ``config.label2id``, if any.
        num_labels: The model's number of outputs, if known; class ids must lie in
            ``[0, num_labels)``.
        regression: Force regression (True) or classification (False); detect when None.
        source: What the labels came from, for error messages (e.g. the file path).

    Returns:
        ``(targets, is_regression, label2id_used)``: ints for classification or floats for
        regression; the mapping used for string labels, else ``None``.

    Raises:
        DataError: If there are no labels, a label is missing, not a number where one is needed,
            NaN/infinite, not an integer class id, or outside the model's classes.
    """
    _check_label_inputs(labels, num_labels, source)
    values, numeric = _parsed_labels(labels, source)
    if regression is None:
        regression = _detect_regression(values, numeric, num_labels)
    if regression:
        return _regression_targets(values, numeric, source), True, None
    ids, used = _class_ids(values, numeric, label2id, num_labels, source)
    _check_class_ids(ids, num_labels, source)
    return ids, False, used



def model_label_mapping(labels: list | None, config: Any, source: str = "the data") -> tuple[list[int] | list[float], bool, dict[str, int] | None]:
    """:func:`label_mapping` for the model whose ``config`` (a transformers config: ``label2id``,
    ``num_labels``, ``problem_type``) the targets are for; a one-output model is a regression."""
    return label_mapping(
        labels,
        label2id=getattr(config, "label2id", None),
        num_labels=config.num_labels,
        regression=(config.problem_type == "regression") or config.num_labels == 1,
        source=source,
    )


def _check_label_inputs(labels: list | None, num_labels: int | None, source: str) -> None:
    """Refuse an empty label list and a model with no outputs."""
    if not labels:
        raise DataError(
            f"{source} has no labels: evaluation and Fisher calibration need a label column "
            "(pass --label-column NAME)"
        )
    if num_labels is not None and num_labels < 1:
        raise DataError(f"num_labels must be at least 1, got {num_labels}: check the model config")


def _parsed_labels(labels: list, source: str) -> tuple[list[int | float | str], bool]:
    """Every label parsed (none missing), and whether all are numbers (never a mix of kinds)."""
    values: list[int | float | str] = []
    for position, raw in enumerate(labels):
        value = parse_label(raw)
        if value is None:
            raise DataError(f"label at position {position} in {source} is missing: fill it in or drop the row")
        values.append(value)
    numeric = all(not isinstance(value, str) for value in values)
    if not numeric and any(not isinstance(value, str) for value in values):
        example = next(value for value in values if not isinstance(value, str))
        word = next(value for value in values if isinstance(value, str))
        raise DataError(
            f"labels in {source} mix numbers ({example!r}) and words ({word!r}): "
            "use one kind of label throughout"
        )
    return values, numeric


def _detect_regression(values: list[int | float | str], numeric: bool, num_labels: int | None) -> bool:
    """A regression for one model output, or, with no model, for numbers not all integers."""
    return num_labels == 1 or (
        num_labels is None and numeric and any(not float(value).is_integer() for value in values)
    )


def _regression_targets(values: list[int | float | str], numeric: bool, source: str) -> list[float]:
    """Regression targets: every label a finite number."""
    if not numeric:
        word = next(value for value in values if isinstance(value, str))
        raise DataError(
            f"label {word!r} in {source} is not a number, but the task is a regression: "
            "check the label column or use a classification model"
        )
    targets = [float(value) for value in values]
    for value in targets:
        if not math.isfinite(value):
            raise DataError(
                f"regression label {value} in {source} is not a finite number: fix or drop those rows"
            )
    return targets


def _class_ids(
    values: list[int | float | str],
    numeric: bool,
    label2id: Mapping[str, int] | None,
    num_labels: int | None,
    source: str,
) -> tuple[list[int], dict[str, int] | None]:
    """Class ids: integral numbers as they are, strings through a mapping (also returned)."""
    if numeric:
        for value in values:
            if not float(value).is_integer():
                raise DataError(
                    f"label {value!r} in {source} is not a class id: check the label column, "
                    "or use a regression model (num_labels=1) for continuous scores"
                )
        return [int(value) for value in values], None
    strings = [str(value) for value in values]
    used = _string_label_map(strings, label2id, num_labels, source)
    return [used[value] for value in strings], used


def _check_class_ids(ids: list[int], num_labels: int | None, source: str) -> None:
    """Refuse class ids outside the model's classes, or negative ones."""
    for value in ids:
        if num_labels is not None and not 0 <= value < num_labels:
            raise DataError(
                f"label {value} in {source} is outside the model's {num_labels} classes "
                f"(0..{num_labels - 1}): check the label column or fine-tune a head with the right "
                "number of classes"
            )
        if value < 0:
            raise DataError(
                f"label {value} in {source} is negative, not a class id: drop unlabelled rows "
                "or check the label column"
            )


def _string_label_map(
    strings: list[str], label2id: Mapping[str, int] | None, num_labels: int | None, source: str
) -> dict[str, int]:
    distinct = sorted(set(strings))
    if label2id:
        if all(value in label2id for value in distinct):
            return {value: int(label2id[value]) for value in distinct}
        folded = {key.casefold(): int(index) for key, index in label2id.items()}
        if len(folded) == len(label2id) and all(value.casefold() in folded for value in distinct):
            return {value: folded[value.casefold()] for value in distinct}
        if not all(_DEFAULT_LABEL_RE.fullmatch(key) for key in label2id):
            logger.warning(
                "labels in %s (%s) do not match the model's label2id (%s): mapping them in sorted order",
                source,
                ", ".join(distinct[:10]),
                ", ".join(label2id),
            )
    if num_labels is not None and len(distinct) > num_labels:
        shown = ", ".join(repr(value) for value in distinct[:10])
        raise DataError(
            f"{source} has {len(distinct)} distinct labels ({shown}) but the model has {num_labels} "
            "classes: check the label column or fine-tune a head with the right number of classes"
        )
    return {value: index for index, value in enumerate(distinct)}
