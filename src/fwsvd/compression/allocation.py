"""Global rank allocation: one parameter budget spent where the method's loss estimate says it matters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import DENSE_CHOICES, Decomposition, allocate_ranks
from ..errors import FwsvdError
from ..methods import Method
from ..nn import LinearInfo, linear_weight
from ..calibration.statistics import Statistics
from ..config import CompressConfig, DEFAULT_RANK_FLOOR


@contextlib.contextmanager
def layer_errors(name: str) -> Iterator[None]:
    """Turn the math core's ``ValueError`` (a statistic it cannot use: negative importance, an indefinite
    covariance) into one line that names the layer and the fix."""
    try:
        yield
    except ValueError as err:
        raise FwsvdError(f"cannot factorize {name}: {err}; recalibrate with --data, or pass statistics saved from this model") from err


def decomposition_cost(info: LinearInfo) -> float:
    """Relative cost of decomposing one layer (flops of an SVD of it plus an eigendecomposition of
    its input covariance), to share layers out evenly among processes."""
    out_f, in_f = info.out_features, info.in_features
    return float(out_f * in_f * min(out_f, in_f) + in_f**3)


def allocation_rules(config: CompressConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`allocate` and :func:`fwsvd.core.allocate_ranks` that ``config`` sets.

    Raises:
        FwsvdError: for ``dense_choice="auto"``, which only :func:`fwsvd.compression.factorize.compress`
            (a whole model in one process, with held-out text) can resolve.
    """
    if config.dense_choice is None:  # the default, where no held-out text is at hand
        return {"floor": config.rank_floor, "dense_above": config.dense_above, "dense_choice": "break-even"}
    if config.dense_choice not in DENSE_CHOICES:
        raise FwsvdError(
            f"--dense-choice {config.dense_choice} scores whole compressed models on held-out text, which this mode "
            "(--low-memory, --sequential, --any-size or torchrun) does not build: pass --dense-choice break-even or loss"
        )
    return {"floor": config.rank_floor, "dense_above": config.dense_above, "dense_choice": config.dense_choice}


def allocation_record(config: CompressConfig, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The allocation as the compression record keeps it: the mode, for global its rules, and the rank multiple;
    with ``--dense-choice auto`` the rule it chose and the held-out perplexities it chose by (``selection``)."""
    mode = config.resolved_allocation()
    rounding = {"rank_multiple": config.rank_multiple} if config.rank_multiple > 1 else {}
    if mode != "global":
        return {"mode": mode, **rounding}
    return {
        "mode": mode,
        "rank_floor": config.rank_floor,
        **({"dense_above": config.dense_above} if config.dense_above < 1 else {}),
        **({"dense_choice": config.dense_choice} if config.dense_choice not in (None, "break-even", "auto") else {}),
        **({"dense_choice": selection["dense_choice"], "dense_choice_auto": {k: v for k, v in selection.items() if k != "dense_choice"}}
           if selection is not None else {}),
        **rounding,
    }


def component_losses(
    model: nn.Module, targets: list[LinearInfo], method: Method, statistics: Statistics | None, *, progress: bool = True
) -> tuple[list[torch.Tensor], dict[str, Decomposition]]:
    """Decompose every target once and price its components by :meth:`Method.component_loss`.

    Returns:
        ``([component losses per target, in order], {target name: decomposition})``; under
        ``torchrun`` the decompositions are those this process made (see
        :func:`fwsvd.calibration.distributed.spread`) and the losses are every target's.
    """
    from ..calibration.distributed import spread

    decompositions: dict[str, Decomposition] = {}

    def decompose(info: LinearInfo) -> list[torch.Tensor]:
        weight = linear_weight(model.get_submodule(info.name)).detach()
        # The statistics go where the weight is (a GPU after calibration there): the decomposition runs there.
        stats = statistics.for_module(info.name, weight.device) if statistics is not None else {}
        with torch.no_grad():
            with layer_errors(info.name):
                dec = method.decompose(weight, stats)
            loss = method.component_loss(dec, stats).double().cpu()
        decompositions[info.name] = dec
        return [loss]

    # Under torchrun each layer is decomposed by one process (which keeps the decomposition) and
    # its component losses handed to all, so every process allocates the same ranks.
    like = lambda info: [((min(info.out_features, info.in_features),), torch.float64)]  # noqa: E731
    losses = [
        loss
        for _, (loss,) in tqdm(spread(targets, decompose, like, decomposition_cost), total=len(targets), desc=f"{method.name} allocate", unit="layer", disable=not progress, leave=False)
    ]
    return losses, decompositions


def allocate(
    model: nn.Module,
    targets: list[LinearInfo],
    method: Method,
    keep: float,
    statistics: Statistics | None,
    *,
    floor: float = DEFAULT_RANK_FLOOR,
    dense_above: float = 1.0,
    dense_choice: str = "break-even",
    progress: bool = True,
) -> tuple[dict[str, int | None], dict[str, Decomposition]]:
    """Global rank allocation: decompose every target once, then share one parameter budget.

    Each layer's components are priced by :meth:`Method.component_loss` and
    :func:`fwsvd.core.allocate_ranks` keeps ``keep`` of all the targets' parameters where the
    estimated loss is largest. The decompositions are returned for the factorization to reuse, so
    every layer is decomposed once.

    Returns:
        ``({target name: rank or None}, {target name: decomposition})``; under ``torchrun`` the
        decompositions are those this process made (see :func:`fwsvd.calibration.distributed.spread`).
    """
    losses, decompositions = component_losses(model, targets, method, statistics, progress=progress)
    return ranks_from_losses(targets, losses, keep, floor=floor, dense_above=dense_above, dense_choice=dense_choice), decompositions


def ranks_from_losses(targets: list[LinearInfo], losses: list[torch.Tensor], keep: float, **rules: Any) -> dict[str, int | None]:
    """``{target name: rank or None}`` that :func:`fwsvd.core.allocate_ranks` gives the targets' component
    ``losses`` at ``keep`` under ``rules`` (``floor``, ``dense_above``, ``dense_choice``)."""
    shapes = [(info.out_features, info.in_features, info.bias) for info in targets]
    return dict(zip([info.name for info in targets], allocate_ranks(losses, shapes, keep, **rules)))
