"""The small public face of fwsvd: one import for every verb and config a user needs.

Each name lives in the package of its pipeline stage (see docs/architecture.md); this module only
re-exports them, as torchao's ``quantize_`` does. Typical use::

    import fwsvd
    lm = fwsvd.load_model("my-bert-sst2")
    config = fwsvd.CompressConfig(method="fwsvd", keep=0.3)
    stats = fwsvd.calibrate(lm, fwsvd.CalibrationConfig(data="train.tsv"), config.needs(lm.task))
    report = fwsvd.compress(lm.model, config, stats, task=lm.task)
    fwsvd.save(lm.model, "out", tokenizer=lm.tokenizer)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .calibration.calibrate import calibrate
from .calibration.files import load_statistics
from .calibration.statistics import Statistics, collect_statistics
from .compression.correction import correct_causal
from .compression.any_size import resize
from .compression.factorize import compress
from .compression.report import CompressionReport, LayerReport
from .config import CalibrationConfig, CompressConfig
from .evaluation.zeroshot import evaluate_zeroshot
from .nn import LowRankLinear, count_parameters
from .storage.folders import cast_factors, cast_weights, inspect, save
from .storage.folders import load as _load_folder
from .storage.int8 import quantize_factors
from .storage.loading import LoadedModel, load_model

__all__ = [
    "resize",
    "CalibrationConfig",
    "CompressConfig",
    "CompressionReport",
    "LayerReport",
    "LoadedModel",
    "LowRankLinear",
    "Statistics",
    "calibrate",
    "cast_factors",
    "cast_weights",
    "collect_statistics",
    "compress",
    "correct_causal",
    "count_parameters",
    "evaluate_zeroshot",
    "inspect",
    "load",
    "load_model",
    "load_statistics",
    "quantize_factors",
    "save",
]


def load(path: str | Path, task: str | None = None, *, keep: float | None = None, **kwargs: Any) -> nn.Module:
    """Load a compressed (or dense) model folder; the task comes from its config when omitted.

    Like ``AutoModelFor<Task>.from_pretrained(path)`` after ``import fwsvd``, but stricter (see
    :func:`fwsvd.storage.loading.load_model`): no code from the folder runs, pickle weights are refused
    unless ``allow_pickle=True``, the compression record is validated, and a missing or unused
    tensor is an error.

    Args:
        keep: for a folder written by ``fwsvd compress --any-size``: the size to materialise, as
            :func:`fwsvd.compression.any_size.resize` makes it (``None``: the folder as it is).

    Raises:
        ModelError: for a missing, unreadable, incomplete or inconsistent folder.
        FwsvdError: for ``keep`` on a folder that is not any-size, or outside ``(0, 1]``.
    """
    model = _load_folder(path, task, **kwargs)
    if keep is not None:
        resize(model, keep)
    return model
