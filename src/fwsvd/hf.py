"""transformers integration: the compression record in ``config.json`` and a registered quantizer.

A compressed model's ``config.json`` carries ``quantization_config`` with ``quant_method: "fwsvd"``:
method, library version, per-module ranks, parameter counts and the calibration summary. After
``import fwsvd``, transformers' documented extension point for custom quantization methods
(``register_quantization_config`` / ``register_quantizer``) lets ``AutoModelFor….from_pretrained``
swap in :class:`~fwsvd.nn.LowRankLinear` skeletons of the recorded ranks before the safetensors
weights are read.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .nn import low_rank_skeleton

QUANT_METHOD = "fwsvd"

__all__ = ["QUANT_METHOD", "FwsvdQuantizationConfig", "FwsvdQuantizer", "compression_record", "register"]


class FwsvdQuantizationConfig(QuantizationConfigMixin):
    """The compression record of a low-rank factorized model.

    Args:
        ranks: ``{module name: rank}`` of every factorized linear layer.
        method: compression method name (``svd``, ``fwsvd``, ``asvd``, ``svd-llm``).
        **record: everything else worth keeping (library version, keep, parameter counts,
            method options, calibration summary); stored verbatim.
    """

    def __init__(self, ranks: dict[str, int] | None = None, method: str = "svd", **record: Any) -> None:
        record.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.method = method
        self.ranks = {str(k): int(v) for k, v in (ranks or {}).items()}
        for key, value in record.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["quant_method"] = QUANT_METHOD
        return data


class FwsvdQuantizer(HfQuantizer):
    """Rebuilds the low-rank structure of a saved fwsvd model during ``from_pretrained``."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        # The model is a skeleton (usually on the meta device): swap in empty low-rank layers of the
        # recorded ranks so the saved factors load into them by name.
        low_rank_skeleton(model, self.quantization_config.ranks)

    @property
    def is_trainable(self) -> bool:
        return True

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True


def register() -> None:
    """Register the ``fwsvd`` quantization method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FwsvdQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FwsvdQuantizer)


def compression_record(config: Any) -> dict[str, Any] | None:
    """The fwsvd record in a model config, as a plain dict, or ``None`` for a dense model."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    return data if data.get("quant_method") == QUANT_METHOD else None
