"""transformers' custom-quantizer extension point: ``from_pretrained`` rebuilds fwsvd folders after ``import fwsvd``."""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..nn import low_rank_skeleton, quantized_skeleton
from ..quantization import scheme_bits
from .record import FwsvdQuantizationConfig, QUANT_METHOD, check_ranks

__all__ = ["FwsvdQuantizer", "register"]


class FwsvdQuantizer(HfQuantizer):
    """Rebuilds the low-rank structure of a saved fwsvd model during ``from_pretrained``."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        # The model is a skeleton (usually on the meta device): swap in empty low-rank layers of the
        # recorded ranks so the saved factors load into them by name.
        check_ranks(model, self.quantization_config.ranks)
        low_rank_skeleton(model, self.quantization_config.ranks)
        grid = getattr(self.quantization_config, "quantized_weights", None)
        if grid is not None:
            # Quantized layers: packed grid, float16 scales and correction factors load by name.
            quantized_skeleton(model, grid["ranks"], scheme_bits(grid["scheme"]), grid["group_size"])
        if getattr(self.quantization_config, "quantized_factors", None) == "int8":
            from .int8 import prepare_skeleton

            prepare_skeleton(model)  # the factors' scales load by name beside their int8 bytes

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if getattr(self.quantization_config, "quantized_factors", None) == "int8":
            from .int8 import dequantize_loaded

            dequantize_loaded(model)  # floating-point factors again, in the model's dtype
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[Any, dict[str, Any]]:
        # save_pretrained of a loaded model asks its quantizer what to write: int8 factors again
        # when the record says so and they are still on their grid (None: the model's own state dict).
        from .int8 import stored_state_dict

        return stored_state_dict(model), {}

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
