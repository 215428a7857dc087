"""fwsvd: make trained transformers smaller by (Fisher-)weighted low-rank factorization.

Importing the package registers the ``fwsvd`` quantization method with transformers, so that
``AutoModelFor….from_pretrained`` reloads compressed folders.
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    CalibrationConfig,
    CompressConfig,
    CompressionReport,
    calibrate,
    compress,
    count_parameters,
    inspect,
    load,
    save,
)
from .correction import correct_causal  # noqa: E402
from .errors import DataError, FwsvdError, ModelError  # noqa: E402
from .hf import register as _register  # noqa: E402
from .methods import METHODS, Method, get_method  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402
from .nn import LowRankLinear  # noqa: E402
from .quantize import quantize_factors  # noqa: E402
from .stats import Statistics, collect_statistics  # noqa: E402
from .zeroshot import evaluate_zeroshot  # noqa: E402

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
