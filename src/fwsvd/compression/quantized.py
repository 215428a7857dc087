"""Quantized weights plus a low-rank correction of their rounding error, ranked under one byte budget.

Each targeted linear ``W`` is rounded to a grid (:mod:`fwsvd.quantization`); its error
``R = W - Q(W)`` is decomposed by the configured method exactly as a weight would be (fwsvd: the
Fisher-row-weighted output error over whitened calibration inputs; svd: plain SVD, LQER/LoRC's
choice; svd-llm: whitening alone, EoRA's), and the components of every layer compete for one byte
budget by the method's loss estimate per byte (:func:`fwsvd.core.allocate_budget`). The layer
becomes a :class:`~fwsvd.nn.QuantizedLinear`; factors are stored in float16 (rounded here, so the
model in memory is the one that reloads).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.files import check_statistics
from ..calibration.statistics import Statistics
from ..config import CompressConfig, QuantizeConfig
from ..core import allocate_budget
from ..errors import FwsvdError
from ..nn import LinearInfo, QuantizedLinear, check_finite_weights, find_targets, linear_bias, linear_weight, swap_module
from ..quantization import packed_bytes, quantize
from ..storage.loading import TASKS
from ..storage.record import FwsvdQuantizationConfig
from ..version import __version__
from .allocation import layer_errors
from .factorize import refuse_compressed

logger = logging.getLogger(__name__)

__all__ = ["QuantizedLayerReport", "QuantizationReport", "compress_quantized", "model_bytes"]

#: The correction factors are stored in float16: two bytes per value.
FACTOR_BYTES = 2


@dataclass
class QuantizedLayerReport:
    """One quantized layer: its grid, correction rank and bytes."""

    name: str
    shape: tuple[int, int]
    group_size: int
    rank: int
    weight_bytes: int
    correction_bytes: int
    dense_bytes: int


@dataclass
class QuantizationReport:
    """What :func:`compress_quantized` did, in bytes (the weight payload of a safetensors folder)."""

    method: str
    scheme: str
    layers: list[QuantizedLayerReport]
    dense_bytes: int
    model_bytes: int
    correction_budget: int
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quantized_bytes"] = sum(r.weight_bytes for r in self.layers)
        data["correction_bytes"] = sum(r.correction_bytes for r in self.layers)
        data["target_dense_bytes"] = sum(r.dense_bytes for r in self.layers)
        data["model_fraction"] = self.model_bytes / self.dense_bytes
        return data


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as a safetensors file holds them: every parameter and persistent
    buffer once (tied weights are one tensor), at its own element size, except the correction factors
    of quantized layers, which are stored in float16 whatever the model computes in."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.device.type != "meta" else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total -= sum(f.numel() * (f.element_size() - FACTOR_BYTES) for f in (module.weight_in, module.weight_out))
    return total


def _quantized_bytes(info: LinearInfo, bits: int, group: int) -> int:
    groups = -(-info.in_features // group)
    return packed_bytes(info.out_features * info.in_features, bits) + info.out_features * groups * 2


def _budget(quant: QuantizeConfig, dense: int, other: int, quantized: int) -> float | None:
    """Bytes the corrections may take (``None``: the fixed rank of ``--correction-rank``)."""
    if quant.correction_rank is not None:
        return None
    if quant.budget_bytes is None:
        return quant.correction_share * quantized
    budget = quant.budget_bytes * dense - other - quantized
    if budget < 0:
        floor = (other + quantized) / dense
        raise FwsvdError(
            f"--budget-bytes {quant.budget_bytes:g} is below what {quant.scheme} alone takes ({floor:.4f} of the dense model's bytes): "
            f"pass at least {floor:.4f}, or a smaller scheme"
        )
    return budget


def compress_quantized(
    model: nn.Module,
    config: CompressConfig,
    quant: QuantizeConfig,
    statistics: Statistics | None = None,
    *,
    task: str = "sequence-classification",
    progress: bool = True,
) -> QuantizationReport:
    """Quantize the targeted linears of ``model`` in place, each plus a low-rank correction of its error.

    Args:
        model: a dense transformers model.
        config: the method (and its options) that weighs the correction, and the targeted layers;
            ``keep`` and the allocation options do not apply.
        quant: the grid and the correction's budget.
        statistics: calibration statistics, as the method needs them.
        task: the model's task (resolves ``auto`` method options).

    Returns:
        A :class:`QuantizationReport`; the record is stored in ``model.config``.

    Raises:
        FwsvdError: on an already-compressed model, missing statistics, a budget below the grid's
            own bytes, or non-finite weights.
    """
    if task not in TASKS:
        raise FwsvdError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    refuse_compressed(model)
    check_finite_weights(model)
    method = config.build_method(task)
    needs = method.needs_for(task)
    have = statistics.kinds if statistics is not None else frozenset()
    if needs - have:
        raise FwsvdError(f"method {method.name} needs calibration statistics {sorted(needs - have)}: pass --data")
    targets = find_targets(model, config.include, config.exclude)
    if statistics is not None:
        check_statistics(statistics, targets)
    start = time.perf_counter()
    dense = model_bytes(model)
    bits = quant.bits
    groups = {t.name: quant.resolved_group_size(t.in_features) for t in targets}
    quantized = {t.name: _quantized_bytes(t, bits, groups[t.name]) for t in targets}
    weights = {t.name: linear_weight(model.get_submodule(t.name)) for t in targets}
    weight_bytes = {name: w.numel() * w.element_size() for name, w in weights.items()}
    other = dense - sum(weight_bytes.values())  # biases, norms, embeddings, head stay as they are
    budget = _budget(quant, dense, other, sum(quantized.values()))

    grids: dict[str, Any] = {}
    decompositions: dict[str, Any] = {}
    losses: list[torch.Tensor] = []
    for info in tqdm(targets, desc=f"{quant.scheme} + {method.name} correction", unit="layer", disable=not progress, leave=False):
        weight = weights[info.name].detach()
        stats = statistics.for_module(info.name, weight.device) if statistics is not None else {}
        with layer_errors(info.name):
            grid = quantize(weight, bits, groups[info.name])
            residual = weight.to(torch.float32) - grid.dequantize()
            grids[info.name] = grid
            if budget is None and quant.correction_rank == 0:
                continue
            with torch.no_grad():
                dec = method.decompose(residual, stats)
                decompositions[info.name] = dec
                losses.append(method.component_loss(dec, stats).cpu())
    if budget is None:
        ranks = {t.name: min(quant.correction_rank or 0, t.out_features, t.in_features) for t in targets}
    else:
        chosen = allocate_budget(losses, [FACTOR_BYTES * (t.out_features + t.in_features) for t in targets], budget)
        ranks = {t.name: r for t, r in zip(targets, chosen)}

    rows: list[QuantizedLayerReport] = []
    for info in targets:
        module = model.get_submodule(info.name)
        weight = linear_weight(module).detach()
        rank = ranks[info.name]
        a = b = None
        if rank:
            a, b = decompositions.pop(info.name).truncate(rank)
            # Rounded to the stored float16 here: the model in memory is the one that reloads.
            a, b = a.to(torch.float16).to(weight.dtype), b.to(torch.float16).to(weight.dtype)
        decompositions.pop(info.name, None)
        grid = grids.pop(info.name)
        bias = linear_bias(module)
        new = QuantizedLinear.from_weight(grid.q, grid.scales, bits, groups[info.name], a, b,
                                          None if bias is None else bias.detach(), dtype=weight.dtype)
        new.train(module.training)
        swap_module(model, info.name, new)
        rows.append(QuantizedLayerReport(info.name, (info.out_features, info.in_features), groups[info.name], rank,
                                         quantized[info.name], FACTOR_BYTES * rank * (info.out_features + info.in_features), weight_bytes[info.name]))
    report = QuantizationReport(
        method=method.name, scheme=quant.scheme, layers=rows, dense_bytes=dense, model_bytes=model_bytes(model),
        correction_budget=int(budget) if budget is not None else sum(r.correction_bytes for r in rows),
        calibration=dict(statistics.summary) if statistics is not None else {}, seconds=round(time.perf_counter() - start, 3),
    )
    _record(model, config, quant, method, report)
    logger.info("%s + %s correction: %.4f of the dense model's bytes", quant.scheme, method.name, report.model_bytes / dense)
    return report


def _record(model: nn.Module, config: CompressConfig, quant: QuantizeConfig, method: Any, report: QuantizationReport) -> None:
    model.config.quantization_config = FwsvdQuantizationConfig(
        ranks={},
        method=method.name,
        library_version=__version__,
        method_options=method.options(),
        include=list(config.include),
        exclude=list(config.exclude),
        calibration=report.calibration,
        quantized_weights={
            "scheme": quant.scheme,
            "group_size": quant.group,
            "factor_dtype": "float16",
            "ranks": {r.name: r.rank for r in report.layers},
            "dense_bytes": report.dense_bytes,
            "model_bytes": report.model_bytes,
        },
    )
