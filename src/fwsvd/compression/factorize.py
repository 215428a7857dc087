"""One-pass compression: factorize the targeted layers and record what was done."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..version import __version__
from ..core import DENSE_CHOICES, Decomposition, dense_parameters, factorized_parameters, rank_for_kept_fraction, round_ranks
from ..errors import FwsvdError
from ..storage.record import FwsvdQuantizationConfig, compression_record
from ..methods import Method
from ..storage.loading import TASKS
from ..nn import LinearInfo, LowRankLinear, check_finite_weights, find_targets, linear_bias, linear_weight, swap_module
from ..calibration.statistics import Statistics
from ..config import CompressConfig
from .report import CompressionReport, LayerReport
from .allocation import allocate, allocation_record, allocation_rules, component_losses, decomposition_cost, layer_errors, ranks_from_losses
from .selection import select_dense_choice
from ..storage.folders import cast_weights
from ..calibration.files import check_statistics
from ..nn import count_parameters

logger = logging.getLogger(__name__)


def compress(
    model: nn.Module,
    config: CompressConfig,
    statistics: Statistics | None = None,
    *,
    task: str = "sequence-classification",
    heldout: torch.Tensor | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Factorize the targeted linear layers of ``model`` in place.

    Each targeted layer gets the rank whose factors keep ``config.keep`` of its parameters (see
    :func:`fwsvd.core.rank_for_kept_fraction`); a layer whose factorization would not save
    parameters stays dense. The compression record is stored in ``model.config`` so that
    :func:`save` writes it to ``config.json``.

    Args:
        model: a transformers model (dense).
        config: method and budget.
        statistics: calibration statistics, required when the method needs any.
        task: model task (resolves ``auto`` method options).
        heldout: ``[n, length]`` token blocks of text the calibration did not see, for a causal LM with
            ``config.dense_choice="auto"`` (see :mod:`fwsvd.compression.selection`).
        progress: show a progress bar over layers.

    Returns:
        A :class:`CompressionReport`.

    Raises:
        FwsvdError: on an already-compressed model, missing statistics, non-finite weights, or
            ``dense_choice="auto"`` without ``heldout`` blocks of a causal LM.
    """
    if task not in TASKS:
        raise FwsvdError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    glob = config.resolved_allocation() == "global"
    # The default (None) chooses on held-out text where it is given; an explicit auto needs it.
    auto = glob and (config.dense_choice == "auto" or (config.dense_choice is None and heldout is not None and task == "causal-lm"))
    if auto and (task != "causal-lm" or heldout is None or len(heldout) == 0):
        raise FwsvdError(
            "--dense-choice auto keeps the allocation rule whose model has the lower next-token loss on held-out text: "
            + ("pass heldout= token blocks (the command line takes them from --data)" if task == "causal-lm" else
               f"a {task} model has no next-token loss; pass --dense-choice break-even or loss")
        )
    refuse_compressed(model)
    method = config.build_method(task)
    needs = method.needs_for(task)
    have = statistics.kinds if statistics is not None else frozenset()
    if needs - have:
        if statistics is None:
            raise FwsvdError(f"method {method.name} needs calibration statistics {sorted(needs - have)}: pass --data")
        raise FwsvdError(
            f"the given statistics hold {sorted(have)} but method {method.name} ({method.options()}) also needs "
            f"{sorted(needs - have)}: recalibrate with --data, or save them with --save-stats from a run of this method"
        )
    targets = find_targets(model, config.include, config.exclude)
    check_finite_weights(model)  # anywhere: a NaN in a layer norm spoils the result as surely as one in a target
    if statistics is not None:
        check_statistics(statistics, targets)
    uncovered = statistics.uncovered([t.name for t in targets], needs) if statistics is not None else []
    if uncovered:
        raise FwsvdError(
            f"the calibration statistics do not cover {len(uncovered)} targeted layers (e.g. {uncovered[0]}): "
            "recalibrate with the same --include/--exclude, or drop --stats"
        )
    before = count_parameters(model)
    start = time.perf_counter()
    ranks = decompositions = selection = None
    if auto:
        assert heldout is not None
        losses, decompositions = component_losses(model, targets, method, statistics, progress=progress)
        candidates = {
            rule: rounded_ranks(targets, config, ranks_from_losses(targets, losses, config.keep, floor=config.rank_floor, dense_above=config.dense_above, dense_choice=rule))
            for rule in DENSE_CHOICES
        }
        rule, selection = select_dense_choice(
            model, targets, candidates,
            # A copy each time: factorize_targets pops what it uses, and the final factorization below needs them all.
            lambda r: factorize_targets(model, targets, method, config.keep, statistics, ranks=r, decompositions=dict(decompositions), progress=False),
            heldout,
        )
        ranks = candidates[rule]
    else:
        if config.resolved_allocation() == "global":
            ranks, decompositions = allocate(model, targets, method, config.keep, statistics, **allocation_rules(config), progress=progress)
        ranks = rounded_ranks(targets, config, ranks)
    rows = factorize_targets(model, targets, method, config.keep, statistics, ranks=ranks, decompositions=decompositions, progress=progress)
    return record_compression(
        model,
        config,
        method,
        rows,
        parameters_before=before,
        calibration=dict(statistics.summary) if statistics is not None else {},
        seconds=time.perf_counter() - start,
        selection=selection,
    )


def refuse_compressed(model: nn.Module) -> None:
    """Raise :class:`FwsvdError` when ``model`` already holds low-rank layers or a compression record."""
    if compression_record(getattr(model, "config", None)) is not None or any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise FwsvdError("this model is already compressed: compress the original dense model instead")


def factorize_targets(
    model: nn.Module,
    targets: list[LinearInfo],
    method: Method,
    keep: float,
    statistics: Statistics | None,
    *,
    ranks: Mapping[str, int | None] | None = None,
    decompositions: dict[str, Decomposition] | None = None,
    correct: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = True,
) -> list[LayerReport]:
    """Swap each of ``targets`` for a :class:`LowRankLinear` that keeps ``keep`` of its parameters.

    The shared per-layer step of :func:`compress` and :func:`fwsvd.compression.sequential.compress_sequential`.
    A layer whose factorization would not save parameters stays dense (rank ``None`` in its row).

    Args:
        ranks: the rank of each target (``None``: stays dense), e.g. from :func:`allocate`; when
            omitted every layer gets its uniform rank for ``keep``.
        decompositions: decompositions already made (by :func:`allocate`), consumed (popped) here
            so that each is freed as soon as its layer is swapped.
        correct: ``(weight, A, B, stats) -> (A, B)`` applied to each layer's factors before the
            swap (sequential mode's refit).

    Returns:
        One :class:`LayerReport` per target, in the order given.
    """
    from ..calibration.distributed import spread

    chosen: dict[str, int | None] = {}
    for info in targets:
        chosen[info.name] = ranks[info.name] if ranks is not None else rank_for_kept_fraction(info.out_features, info.in_features, keep, bias=info.bias)

    def factorize(info: LinearInfo) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        rank = chosen[info.name]
        if rank is None:
            return []
        weight = linear_weight(model.get_submodule(info.name)).detach()
        stats = statistics.for_module(info.name, weight.device) if statistics is not None else {}
        with torch.no_grad():
            cached = decompositions.pop(info.name, None) if decompositions is not None else None
            with layer_errors(info.name):
                a, b = cached.truncate(rank) if cached is not None else method.factorize(weight, rank, stats)
            if correct is not None:
                a, b = correct(weight, a, b, stats)
        return [a.to(weight.dtype), b.to(weight.dtype), torch.tensor([time.perf_counter() - t0], dtype=torch.float64)]

    def like(info: LinearInfo) -> list[tuple[tuple[int, ...], torch.dtype]]:
        rank, dtype = chosen[info.name], linear_weight(model.get_submodule(info.name)).dtype
        if rank is None:
            return []
        return [((info.out_features, rank), dtype), ((rank, info.in_features), dtype), ((1,), torch.float64)]

    # Under torchrun each layer is factorized by one process (the one that decomposed it in
    # allocate, as both spread the same targets at the same costs) and its factors handed to all.
    rows: list[LayerReport] = []
    for info, factors in tqdm(spread(targets, factorize, like, decomposition_cost), total=len(targets), desc=f"{method.name} keep={keep:g}", unit="layer", disable=not progress, leave=False):
        dense = dense_parameters(info.out_features, info.in_features, info.bias)
        rank = chosen[info.name]
        if rank is None:
            rows.append(LayerReport(info.name, (info.out_features, info.in_features), None, dense, dense, 0.0))
            continue
        t0 = time.perf_counter()
        a, b, seconds = factors
        module = model.get_submodule(info.name)
        # Under torchrun the factors arrive on the device they were broadcast on: they join the layer's.
        a, b = a.to(linear_weight(module).device), b.to(linear_weight(module).device)
        with torch.no_grad():
            bias = linear_bias(module)
            new = LowRankLinear.from_factors(a, b, None if bias is None else bias.detach())
        new.train(module.training)
        swap_module(model, info.name, new)
        rows.append(
            LayerReport(
                info.name,
                (info.out_features, info.in_features),
                rank,
                dense,
                factorized_parameters(info.out_features, info.in_features, rank, info.bias),
                round(float(seconds) + time.perf_counter() - t0, 4),
            )
        )
    return rows


def rounded_ranks(targets: list[LinearInfo], config: CompressConfig, ranks: Mapping[str, int | None] | None) -> dict[str, int | None] | None:
    """``ranks`` (``None``: each target's uniform rank for ``config.keep``) moved to multiples of
    ``config.rank_multiple`` by :func:`fwsvd.core.round_ranks`, within the same parameter total;
    ``ranks`` unchanged when the multiple is 1."""
    if config.rank_multiple == 1:
        return dict(ranks) if ranks is not None else None
    chosen = [
        ranks[t.name] if ranks is not None else rank_for_kept_fraction(t.out_features, t.in_features, config.keep, bias=t.bias)
        for t in targets
    ]
    shapes = [(t.out_features, t.in_features, t.bias) for t in targets]
    return {t.name: r for t, r in zip(targets, round_ranks(chosen, shapes, config.rank_multiple))}


def record_compression(
    model: nn.Module,
    config: CompressConfig,
    method: Method,
    rows: list[LayerReport],
    *,
    parameters_before: int,
    calibration: dict[str, Any],
    seconds: float,
    selection: dict[str, Any] | None = None,
) -> CompressionReport:
    """Build the :class:`CompressionReport` and store the compression record in ``model.config``
    (``selection``: what ``--dense-choice auto`` chose, for the allocation record)."""
    report = CompressionReport(
        method=method.name,
        keep=config.keep,
        layers=rows,
        parameters_before=parameters_before,
        parameters_after=count_parameters(model),
        calibration=calibration,
        seconds_factorize=round(seconds, 3),
        method_options=method.options(),
    )
    record = report.to_dict()
    model.config.quantization_config = FwsvdQuantizationConfig(
        ranks={r.name: r.rank for r in rows if r.rank is not None},
        method=method.name,
        library_version=__version__,
        method_options=record["method_options"],
        keep=config.keep,
        include=list(config.include),
        exclude=list(config.exclude),
        dense_layers=[r.name for r in rows if r.rank is None],
        parameters=record["parameters"],
        dense_parameters=record["dense_parameters"],
        target_parameters=record["target_parameters"],
        target_dense_parameters=record["target_dense_parameters"],
        target_keep=record["target_keep"],
        calibration=record["calibration"],
        allocation=allocation_record(config, selection),
    )
    if config.dtype is not None:
        cast_weights(model, config.dtype)
    logger.info("%s: kept %.3f of targeted parameters, %.3f of the model", method.name, report.target_keep, report.model_keep)
    return report
