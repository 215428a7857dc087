"""Compress once, materialise any size: every layer's whole decomposition in ranked order, resized in seconds.

:func:`compress_any_size` decomposes each targeted layer once (as :func:`~fwsvd.compression.factorize.compress`
does) and keeps all of it: each layer becomes a :class:`~fwsvd.nn.LowRankLinear` of full rank
``min(out, in)`` whose components are in the method's order, the factors rounded to float16 (so the
folder is no larger than the dense one: ``2 (out + in) min(out, in)`` bytes against ``4 out in``), and
the record keeps every component's price (:meth:`Method.component_loss`) with the allocation rules.
:func:`resize` then allocates ranks for any ``keep`` exactly as a direct compression would (the same
prices, the same :func:`fwsvd.core.allocate_ranks`) and truncates: no calibration, no decomposition.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.files import check_statistics
from ..calibration.statistics import Statistics
from ..config import CompressConfig
from ..core import allocate_ranks, dense_parameters, factorized_parameters, rank_for_kept_fraction
from ..errors import FwsvdError
from ..nn import LINEAR_TYPES, LinearInfo, LowRankLinear, check_finite_weights, count_parameters, find_targets, linear_bias, linear_weight, swap_module
from ..storage.loading import TASKS
from ..storage.record import FwsvdQuantizationConfig, compression_record
from ..version import __version__
from .allocation import allocation_rules, layer_errors
from .factorize import record_compression, refuse_compressed
from .report import CompressionReport, LayerReport

logger = logging.getLogger(__name__)

__all__ = ["compress_any_size", "resize"]


def compress_any_size(
    model: nn.Module, config: CompressConfig, statistics: Statistics | None = None, *, task: str = "sequence-classification", progress: bool = True,
) -> dict[str, Any]:
    """Decompose every targeted layer of ``model`` in place and keep all of it, for :func:`resize`.

    ``config.keep`` does not apply; its method, options, targets and allocation rules do (they are
    recorded and used by every later resize).

    Returns:
        A summary: layers, seconds, the method, and the calibration summary.

    Raises:
        FwsvdError: on an already-compressed model, missing statistics, or ``rank_multiple`` above 1.
    """
    if task not in TASKS:
        raise FwsvdError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if config.rank_multiple != 1:
        raise FwsvdError("--rank-multiple rounds the ranks of one size: resize the any-size folder, then compress that size, or drop --rank-multiple")
    refuse_compressed(model)
    method = config.build_method(task)
    needs = method.needs_for(task)
    if needs - (statistics.kinds if statistics is not None else frozenset()):
        raise FwsvdError(f"method {method.name} needs calibration statistics {sorted(needs)}: pass --data")
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)
    if statistics is not None:
        check_statistics(statistics, targets)
    start = time.perf_counter()
    before = count_parameters(model)
    losses: dict[str, list[float]] = {}
    for info in tqdm(targets, desc=f"{method.name} any size", unit="layer", disable=not progress, leave=False):
        module = model.get_submodule(info.name)
        weight = linear_weight(module).detach()
        stats = statistics.for_module(info.name, weight.device) if statistics is not None else {}
        with torch.no_grad(), layer_errors(info.name):
            dec = method.decompose(weight, stats)
            losses[info.name] = [float(v) for v in method.component_loss(dec, stats).double()]
            a, b = dec.truncate(dec.max_rank)
        bias = linear_bias(module)
        # float16 values: the folder stores them so, and the model in memory is the one that reloads.
        new = LowRankLinear.from_factors(a.to(torch.float16).to(weight.dtype), b.to(torch.float16).to(weight.dtype), None if bias is None else bias.detach())
        new.train(module.training)
        swap_module(model, info.name, new)
    seconds = time.perf_counter() - start
    mode = config.resolved_allocation()
    model.config.quantization_config = FwsvdQuantizationConfig(
        ranks={info.name: min(info.out_features, info.in_features) for info in targets},
        method=method.name,
        library_version=__version__,
        method_options=method.options(),
        include=list(config.include),
        exclude=list(config.exclude),
        dense_parameters=before,
        calibration=dict(statistics.summary) if statistics is not None else {},
        any_size={
            "losses": losses,
            # The rules as allocation_rules resolves them (the default dense choice: break-even).
            "allocation": {"mode": mode, **({{"floor": "rank_floor"}.get(k, k): v for k, v in allocation_rules(config).items()} if mode == "global" else {})},
            "factor_dtype": "float16",
        },
    )
    logger.info("%s any size: %d layers decomposed in %.1f s", method.name, len(targets), seconds)
    return {"method": method.name, "layers": len(targets), "seconds_factorize": round(seconds, 3), "parameters_before": before,
            "calibration": dict(statistics.summary) if statistics is not None else {}}


def _dense_like(original: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dense layer of the original module's type (``nn.Linear`` or GPT-2's ``Conv1D``) holding ``weight`` ``[out, in]``."""
    from transformers.pytorch_utils import Conv1D

    out_f, in_f = weight.shape
    if isinstance(original, Conv1D):
        layer = Conv1D(out_f, in_f)
        with torch.no_grad():
            layer.weight.copy_(weight.T)
            layer.bias.copy_(bias if bias is not None else torch.zeros(out_f))
        return layer.to(weight.dtype)
    layer = nn.Linear(in_f, out_f, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def resize(model: nn.Module, keep: float, *, skeleton: nn.Module | None = None) -> CompressionReport:
    """Turn a model loaded from an any-size folder into the compression at ``keep``, in place.

    Ranks come from the recorded prices and allocation rules, as :func:`~fwsvd.compression.factorize.compress`
    would choose them; each layer keeps the first components of its decomposition, and one whose rank
    passes break-even turns dense again (``A @ B`` at full rank).

    Args:
        model: loaded from a folder written after :func:`compress_any_size`.
        keep: fraction of the targeted layers' parameters that stays, in ``(0, 1]``.
        skeleton: the dense architecture (any device, ``meta`` is fine), to give a layer that turns
            dense its original type (GPT-2's ``Conv1D``); built from the model's config on the meta
            device when omitted and some layer turns dense.

    Raises:
        FwsvdError: for a model without an any-size record, or a ``keep`` outside ``(0, 1]``.
    """
    record = compression_record(getattr(model, "config", None)) or {}
    grid = record.get("any_size")
    if grid is None:
        raise FwsvdError("this model is not an any-size folder (no any_size record): compress it with --any-size first")
    alloc = grid["allocation"]
    # The config a direct compression at this keep would have had (validates keep).
    config = CompressConfig(
        method=record["method"], keep=keep, include=tuple(record.get("include", ())), exclude=tuple(record.get("exclude", ())),
        allocation=alloc["mode"], rank_floor=alloc.get("rank_floor", 0.5), dense_above=alloc.get("dense_above", 1.0),
        dense_choice=alloc.get("dense_choice", "break-even"),
    )
    start = time.perf_counter()
    names = list(grid["losses"])
    infos = [_info(model, name) for name in names]
    if alloc["mode"] == "global":
        chosen = allocate_ranks([torch.tensor(grid["losses"][n], dtype=torch.float64) for n in names],
                                [(i.out_features, i.in_features, i.bias) for i in infos], keep, **allocation_rules(config))
    else:
        chosen = [rank_for_kept_fraction(i.out_features, i.in_features, keep, bias=i.bias) for i in infos]
    if skeleton is None and any(rank is None for rank in chosen):
        skeleton = _dense_skeleton(model)
    rows: list[LayerReport] = []
    for info, rank in zip(infos, chosen):
        layer = model.get_submodule(info.name)
        dense = dense_parameters(info.out_features, info.in_features, info.bias)
        with torch.no_grad():
            if rank is None:
                original = skeleton.get_submodule(info.name)
                swap_module(model, info.name, _dense_like(original, layer.dense_weight().detach(), None if layer.bias is None else layer.bias.detach()))
                rows.append(LayerReport(info.name, (info.out_features, info.in_features), None, dense, dense, 0.0))
                continue
            new = LowRankLinear.from_factors(layer.weight_out[:, :rank].detach().clone(), layer.weight_in[:rank].detach().clone(),
                                             None if layer.bias is None else layer.bias.detach())
        new.train(layer.training)
        swap_module(model, info.name, new)
        rows.append(LayerReport(info.name, (info.out_features, info.in_features), rank, dense,
                                factorized_parameters(info.out_features, info.in_features, rank, info.bias), 0.0))
    report = record_compression(
        model, config, _RecordedMethod(record), rows,
        parameters_before=record["dense_parameters"], calibration=dict(record.get("calibration", {})), seconds=time.perf_counter() - start,
    )
    logger.info("resized to keep %g in %.2f s", keep, time.perf_counter() - start)
    return report


def _dense_skeleton(model: nn.Module) -> nn.Module:
    """The dense architecture of ``model`` on the meta device (no memory), to read each layer's original type."""
    import copy

    from accelerate import init_empty_weights

    from ..storage.loading import auto_model_class, detect_task

    config = copy.deepcopy(model.config)
    config.quantization_config = None
    with init_empty_weights():
        return auto_model_class(detect_task(config)).from_config(config)


class _RecordedMethod:
    """The method as the any-size record names it, with the options it was run with."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.name = record["method"]
        self._options = dict(record.get("method_options", {}))

    def options(self) -> dict[str, Any]:
        return dict(self._options)


def _info(model: nn.Module, name: str) -> LinearInfo:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise FwsvdError(f"the any-size record names {name!r}, which this model does not have: restore the folder's config.json") from None
    if not isinstance(layer, LowRankLinear):
        kind = "a dense linear layer" if isinstance(layer, LINEAR_TYPES) else type(layer).__name__
        raise FwsvdError(f"{name} is {kind}, not the full decomposition an any-size folder holds: restore the folder")
    return LinearInfo(name, layer.out_features, layer.in_features, layer.bias is not None, "linear")
