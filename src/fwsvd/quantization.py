"""Weight quantization grids, as pure tensor functions: round-to-nearest symmetric int8/int4/int3 with one
scale per group of inputs, and the bit packing that stores them compactly.

The grid is torchao's symmetric affine scheme (``choose_qparams_affine`` with ``MappingType.SYMMETRIC``
then ``quantize_affine``): ``scale = max|w| / ((qmax - qmin) / 2)`` per group, ``q = clamp(round(w /
scale), qmin, qmax)``. It is written out here rather than imported because importing torchao costs
seconds and logs a CUDA-kernel warning on every CPU-only run; ``tests/test_quantization.py`` checks it
against torchao's own functions value for value.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SCHEMES",
    "QuantizedWeight",
    "dequantize",
    "pack",
    "packed_bytes",
    "quantize",
    "scheme_bits",
    "unpack",
]

#: Scheme name -> bits per weight.
SCHEMES = {"int8": 8, "int4": 4, "int3": 3}
#: Scales are stored in float16: 2 bytes per group (a sixteenth of a bit per weight at group 256, half a bit at 32).
SCALE_DTYPE = torch.float16
#: The smallest scale (float16's smallest normal number): an all-zero group quantizes to zeros.
_EPS = float(torch.finfo(torch.float16).tiny)


def scheme_bits(scheme: str) -> int:
    """Bits per weight of ``scheme``.

    Raises:
        ValueError: for an unknown scheme.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} must be one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def _range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class QuantizedWeight:
    """A quantized ``[out, in]`` weight: integer values ``q`` (int8 tensor of the same shape) and
    ``scales`` ``[out, ceil(in / group_size)]``."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> None:
        self.q, self.scales, self.bits, self.group_size = q, scales, bits, group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.group_size, dtype)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, groups, group_size]`` view of the weight, the last group padded with zeros."""
    out_f, in_f = weight.shape
    groups = math.ceil(in_f / group_size)
    pad = groups * group_size - in_f
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(out_f, groups, group_size)


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of an ``[out, in]`` weight, one scale per ``group_size``
    inputs of each row (``None``: one scale per row).

    Args:
        weight: floating-point weight (computed in float32).
        bits: 8, 4 or 3.
        group_size: inputs per scale; the last group of a row may be shorter.

    Raises:
        ValueError: on a non-2-D or non-finite weight, unsupported bits, or a group size below 1.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if bits not in SCHEMES.values():
        raise ValueError(f"bits {bits} must be one of {sorted(SCHEMES.values())}")
    group = weight.shape[1] if group_size is None else group_size
    if group < 1:
        raise ValueError(f"group size {group_size} must be at least 1")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or infinite values")
    qmin, qmax = _range(bits)
    grouped = _grouped(w, group)
    amax = grouped.abs().amax(dim=-1)
    # The scale is rounded to its stored dtype first, so the values are chosen for the scale that is kept.
    scales = (amax / ((qmax - qmin) / 2)).clamp_min(_EPS).to(SCALE_DTYPE)
    # By the reciprocal in the scale's dtype, as torchao does (a float32 division rounds differently at a few ties).
    q = torch.clamp(torch.round(grouped * (1.0 / scales).float()[..., None]), qmin, qmax).to(torch.int8)
    q = q.reshape(w.shape[0], -1)[:, : w.shape[1]].contiguous()
    return QuantizedWeight(q, scales, bits, group)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The floating-point weight of integer values ``q`` ``[out, in]`` and ``scales`` ``[out, groups]``."""
    out_f, in_f = q.shape
    grouped = _grouped(q.to(torch.float32), group_size)
    return (grouped * scales.to(torch.float32)[..., None]).reshape(out_f, -1)[:, :in_f].to(dtype)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack` uses for ``numel`` values of ``bits`` bits."""
    return math.ceil(numel * bits / 8) if bits != 3 else 3 * math.ceil(numel / 8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values of ``bits`` bits (an int8 tensor, any shape) into a flat uint8 tensor.

    int8 is stored as it is; int4 two values per byte; int3 eight values in three bytes.
    """
    flat = q.reshape(-1).to(torch.int16)
    if bits == 8:
        return flat.to(torch.int8).view(torch.uint8).clone()
    qmin, _ = _range(bits)
    u = (flat - qmin).to(torch.int32)  # 0 .. 2**bits - 1
    per = 2 if bits == 4 else 8
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.reshape(-1, per)
    if bits == 4:
        return (u[:, 0] | (u[:, 1] << 4)).to(torch.uint8)
    word = u.new_zeros(u.shape[0])  # int32, on the device of the grid (a GPU too)
    for i in range(8):
        word |= u[:, i] << (3 * i)
    return torch.stack([(word >> (8 * k)) & 0xFF for k in range(3)], dim=1).reshape(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The int8 values of ``shape`` that :func:`pack` stored in ``packed``.

    Raises:
        ValueError: when ``packed`` does not hold exactly the bytes of ``shape`` at ``bits`` bits.
    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != packed_bytes(numel, bits):
        raise ValueError(
            f"packed weights are {packed.dtype} of shape {list(packed.shape)}, not the {packed_bytes(numel, bits)} bytes "
            f"of {list(shape)} values at {bits} bits"
        )
    if bits == 8:
        return packed.view(torch.int8).reshape(shape).clone()
    qmin, _ = _range(bits)
    b = packed.to(torch.int32)
    if bits == 4:
        u = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)
    else:
        trio = b.reshape(-1, 3)
        word = trio[:, 0] | (trio[:, 1] << 8) | (trio[:, 2] << 16)
        u = torch.stack([(word >> (3 * i)) & 0x7 for i in range(8)], dim=1).reshape(-1)
    return (u[:numel] + qmin).to(torch.int8).reshape(shape)
