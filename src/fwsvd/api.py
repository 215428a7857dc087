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

from .calibration.calibrate import calibrate
from .calibration.files import load_statistics
from .calibration.statistics import Statistics, collect_statistics
from .compression.correction import correct_causal
from .compression.factorize import compress
from .compression.report import CompressionReport, LayerReport
from .config import CalibrationConfig, CompressConfig
from .evaluation.zeroshot import evaluate_zeroshot
from .nn import LowRankLinear, count_parameters
from .storage.folders import cast_factors, cast_weights, inspect, load, save
from .storage.int8 import quantize_factors
from .storage.loading import LoadedModel, load_model

__all__ = [
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
