"""fwsvd: make trained transformers smaller by (Fisher-)weighted low-rank factorization.

Importing the package registers the ``fwsvd`` quantization method with transformers, so that
``AutoModelFor….from_pretrained`` reloads compressed folders.
"""

from .api import (
    CalibrationConfig,
    CompressConfig,
    CompressionReport,
    LoadedModel,
    LowRankLinear,
    Statistics,
    calibrate,
    collect_statistics,
    compress,
    correct_causal,
    count_parameters,
    evaluate_zeroshot,
    inspect,
    load,
    load_model,
    quantize_factors,
    save,
)
from .errors import DataError, FwsvdError, ModelError
from .methods import METHODS, Method, get_method
from .storage.quantizer import register as _register
from .version import __version__  # noqa: F401  (fwsvd.__version__)

_register()

__all__ = [
    "METHODS",
    "CalibrationConfig",
    "CompressConfig",
    "CompressionReport",
    "DataError",
    "FwsvdError",
    "LoadedModel",
    "LowRankLinear",
    "Method",
    "ModelError",
    "Statistics",
    "calibrate",
    "collect_statistics",
    "compress",
    "correct_causal",
    "count_parameters",
    "evaluate_zeroshot",
    "get_method",
    "inspect",
    "load",
    "load_model",
    "quantize_factors",
    "save",
]
