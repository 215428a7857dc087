"""int8 storage of the low-rank factors: one signed byte per entry and one float32 scale per row.

``fwsvd compress --quantize-factors int8`` rounds every factor of every :class:`LowRankLinear`
to a symmetric per-row grid (``scale = max |row| / 127``, entries ``round(w / scale)`` in
``[-127, 127]``). The model keeps computing in floating point with the rounded values, so what
is evaluated in the compressing process is what the folder holds. :func:`fwsvd.save` writes each
factor as int8 beside ``<factor>_scale`` (float32, one value per row), a quarter of the float32
bytes; the record says ``quantized_factors: "int8"``. Loading (``fwsvd.load``, or
``from_pretrained`` after ``import fwsvd``) reads the bytes and scales into the skeleton and turns
them back into floating-point factors in the model's dtype: no int8 arithmetic runs (on CPUs
without int8 matrix units torch's int8 kernels are slower than float32; see the README's Speed
section), so the gain is the folder's size.

A model whose factors left the grid (fine-tuned after loading, or computing in bfloat16) is saved
in floating point, and the record no longer says int8: :func:`storage_state_dict` checks every
factor before writing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FwsvdError, ModelError
from .record import FwsvdQuantizationConfig
from ..nn import FACTORS, LowRankLinear, QuantizedLinear

#: What ``--quantize-factors`` accepts.
QUANTIZED_FORMATS = ("int8",)
SCALE_SUFFIX = "_scale"
_LEVELS = 127  # symmetric: -127 .. 127, so negating a row never overflows

__all__ = [
    "stored_state_dict",
    "QUANTIZED_FORMATS",
    "dequantize_loaded",
    "dequantize_rows",
    "prepare_skeleton",
    "quantize_factors",
    "quantize_rows",
    "storage_state_dict",
]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` int8 in ``[-127, 127]`` and ``scale`` float32 per row, ``weight ≈ q * scale[:, None]``.

    An all-zero row gets scale 1 (and zeros), so every scale is positive and finite.
    """
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / _LEVELS, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` in ``dtype`` (computed in float32)."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def _on_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 form of ``weight`` when it already lies on its own grid (within float32 rounding), else ``None``."""
    if weight.dtype != torch.float32:
        return None
    q, scale = quantize_rows(weight)
    step_error = (weight.detach() - dequantize_rows(q, scale)).abs() / scale[:, None]
    return (q, scale) if bool((step_error <= 1e-3).all()) else None


def _record(model: nn.Module) -> Any:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return qc if isinstance(qc, FwsvdQuantizationConfig) else None


def quantize_factors(model: nn.Module, fmt: str = "int8") -> int:
    """Round every factor of ``model``'s low-rank layers to its int8 grid, in place; the record says ``fmt``.

    The model keeps its dtype and computes with the rounded values. Returns the number of layers.

    Raises:
        FwsvdError: for an unknown format, a model without a compression record, or factors not in float32.
    """
    if fmt not in QUANTIZED_FORMATS:
        raise FwsvdError(f"--quantize-factors {fmt!r} must be one of {', '.join(QUANTIZED_FORMATS)}")
    qc = _record(model)
    if qc is None:
        raise FwsvdError("quantize_factors needs a model compressed by fwsvd (with its compression record)")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if any(getattr(m, f).dtype != torch.float32 for m in layers for f in FACTORS):
        raise FwsvdError("--quantize-factors rounds float32 factors: quantize before casting with --dtype (the command line does this)")
    with torch.no_grad():
        for module in layers:
            for name in FACTORS:
                param = getattr(module, name)
                param.copy_(dequantize_rows(*quantize_rows(param)))
    qc.quantized_factors = fmt
    return len(layers)


def storage_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict :func:`fwsvd.save` writes for an int8 record: each factor as int8 plus its scales.

    ``None`` when the record does not say int8. When it does but some factor is off its grid (the
    model trained or changed dtype since), the record's ``quantized_factors`` is dropped and
    ``None`` returned, so the folder holds the floating-point factors and says so.
    """
    qc = _record(model)
    if qc is None or getattr(qc, "quantized_factors", None) != "int8":
        return None
    packed: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        for name in FACTORS:
            grid = _on_grid(getattr(module, name))
            if grid is None:
                del qc.quantized_factors
                return None
            key = f"{prefix}.{name}" if prefix else name
            packed[key], packed[key + SCALE_SUFFIX] = grid
    state = model.state_dict()
    state.update(packed)
    return state


def prepare_skeleton(model: nn.Module) -> None:
    """Give each low-rank layer of a skeleton about to load an int8 folder its scale buffers (so they load by name)."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            for name in FACTORS:
                param = getattr(module, name)
                module.register_buffer(name + SCALE_SUFFIX, torch.empty(param.shape[0], device=param.device, dtype=torch.float32))


def dequantize_loaded(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """After loading an int8 folder: every factor back to floating point (``dtype``, default the model's), scale buffers removed.

    Raises:
        ModelError: when a factor or scale did not load as the record says (wrong dtype or shape, non-finite or non-positive scale).
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for prefix, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        for name in FACTORS:
            q = getattr(module, name)
            scale = module._buffers.pop(name + SCALE_SUFFIX, None)
            where = f"{prefix}.{name}"
            if q.dtype != torch.int8 or scale is None:
                raise ModelError(f"{where} is stored as {q.dtype} but the record says int8 factors: the folder's weights do not match its config.json")
            if scale.shape != (q.shape[0],) or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                raise ModelError(f"{where}{SCALE_SUFFIX} must hold {q.shape[0]} positive finite scales: the folder's weights are damaged")
            setattr(module, name, nn.Parameter(dequantize_rows(q.data, scale, dtype), requires_grad=True))


def stored_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict a folder stores: :func:`storage_state_dict`'s int8 factors, and every
    :class:`~fwsvd.nn.QuantizedLinear`'s correction factors (an any-size folder's low-rank factors) in float16, as the record says they are
    stored. ``None``: the model's own state dict (nothing to change). Used by :func:`fwsvd.save` and by
    ``save_pretrained`` of a model loaded with ``from_pretrained`` (through the quantizer)."""
    state = storage_state_dict(model)
    layers = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    record = _record(model)
    if record is not None and getattr(record, "any_size", None) is not None:
        # An any-size folder stores its full decompositions in float16 (fwsvd.compression.any_size).
        layers += [name for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not layers:
        return state
    state = dict(state if state is not None else model.state_dict())
    for name in layers:
        for factor in FACTORS:
            key = f"{name}.{factor}" if name else factor
            state[key] = state[key].to(torch.float16)
    return state
