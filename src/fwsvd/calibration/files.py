"""Statistics files (``--stats``): read and check a file anyone may have written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FwsvdError
from ..nn import LinearInfo
from .statistics import Statistics


#: Per-module tensors a statistics file may hold, and their shape for an ``[out, in]`` layer.
_STAT_SHAPES = {
    "fisher_out": lambda o, i: (o,),
    "fisher_in": lambda o, i: (i,),
    "fisher_full": lambda o, i: (o, i),
    "act_abs_mean": lambda o, i: (i,),
    "cov": lambda o, i: (i, i),
}


def load_statistics(path: str | Path) -> Statistics:
    """Read a statistics file written by ``--save-stats`` (:meth:`Statistics.save`), checking it first.

    The file may come from anywhere: it must be a safetensors file with fwsvd's metadata (format,
    shared-input map, summary with known kinds) and finite floating-point tensors named
    ``module::statistic``; nothing is unpickled.

    Raises:
        FwsvdError: naming what is wrong with the file.
    """
    import json

    from safetensors import SafetensorError, safe_open

    from .statistics import STATISTICS_FORMAT, STAT_KINDS

    path = Path(path).expanduser()
    fix = "pass a file written by fwsvd compress --save-stats"
    if not path.is_file():
        raise FwsvdError(f"statistics file {path} does not exist: run a calibration with --save-stats first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise FwsvdError(f"{path} is not an fwsvd statistics file (not safetensors: {str(err).splitlines()[0] if str(err) else type(err).__name__}): {fix}") from err
    if meta.get("format") != STATISTICS_FORMAT:
        raise FwsvdError(f"{path} is not an fwsvd statistics file (format {meta.get('format')!r}, expected {STATISTICS_FORMAT!r}): {fix}")
    parsed: dict[str, Any] = {}
    for key in ("shared", "summary"):
        if key not in meta:
            raise FwsvdError(f"statistics file {path} lacks its {key!r} metadata: {fix}")
        try:
            parsed[key] = json.loads(meta[key])
        except (json.JSONDecodeError, RecursionError) as err:
            raise FwsvdError(f"statistics file {path} has unreadable {key!r} metadata ({err}): {fix}") from err
    shared, summary = parsed["shared"], parsed["summary"]
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise FwsvdError(f"statistics file {path}: 'shared' metadata is not a map of module names: {fix}")
    if not isinstance(summary, dict):
        raise FwsvdError(f"statistics file {path}: 'summary' metadata is not an object: {fix}")
    kinds = summary.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k in STAT_KINDS for k in kinds):
        raise FwsvdError(f"statistics file {path}: kinds {kinds!r} are not a list of {sorted(STAT_KINDS)}: {fix}")
    for key in keys:
        name, sep, stat = key.rpartition("::")
        if not sep or not name or stat not in _STAT_SHAPES:
            raise FwsvdError(f"statistics file {path} holds tensor {key[:80]!r}, not module::statistic with a known statistic: {fix}")
    try:
        statistics = Statistics.load(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise FwsvdError(f"cannot read statistics file {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__}): {fix}") from err
    for name, stats in statistics.tensors.items():
        for stat, tensor in stats.items():
            problem = _statistic_problem(stat, tensor)
            if problem is not None:
                raise FwsvdError(f"statistic {stat} of {name} in {path} {problem}: {fix}")
    return statistics


#: Relative tolerance of the covariance checks: float32 sums of ``x xᵀ`` are symmetric and have a
#: non-negative diagonal exactly, so anything beyond round-off means the file was changed.
_COV_TOLERANCE = 1e-4


def _statistic_problem(stat: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with one statistic read from a file (``None``: nothing).

    Shapes against the model are checked later (:func:`check_statistics`); here: floating point,
    finite, the Fisher sums and mean activations non-negative, a covariance square, symmetric, with a
    non-negative diagonal. Positive semi-definiteness itself is checked where the covariance is
    decomposed (:func:`fwsvd.core.whitened_decomposition`), which is the only place that can afford it.
    """
    if not tensor.is_floating_point():
        return f"is stored as {tensor.dtype}, not floating point"
    if not bool(torch.isfinite(tensor).all()):
        return "holds NaN or infinite values"
    if stat in ("fisher_out", "fisher_in", "fisher_full", "act_abs_mean") and bool((tensor < 0).any()):
        return f"holds negative values (smallest {tensor.min().item():.3g}), which a sum of squares or of magnitudes never has"
    if stat == "cov":
        if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
            return f"has shape {list(tensor.shape)}, not a square matrix"
        cov = tensor.double()
        scale = cov.abs().max().item()
        if bool((cov.diagonal() < -_COV_TOLERANCE * scale).any()):
            return "has a negative diagonal entry, so it is not a covariance"
        if (cov - cov.T).abs().max().item() > _COV_TOLERANCE * scale:
            return "is not symmetric, so it is not a covariance"
    return None


def check_statistics(statistics: Statistics, targets: list[LinearInfo]) -> None:
    """Check that the statistics of each targeted layer have the shapes that layer implies.

    Raises:
        FwsvdError: when a statistic was computed on another model (a shape differs).
    """
    for info in targets:
        for stat, tensor in statistics.for_module(info.name).items():
            shape = _STAT_SHAPES.get(stat)
            expected = shape(info.out_features, info.in_features) if shape is not None else tuple(tensor.shape)
            if tuple(tensor.shape) != expected:
                raise FwsvdError(
                    f"the statistics do not fit this model: {stat} of {info.name} has shape {list(tensor.shape)} but the layer is "
                    f"{info.out_features}x{info.in_features} (expected {list(expected)}); they come from another model: "
                    "recalibrate with --data, or pass statistics saved from this model"
                )
